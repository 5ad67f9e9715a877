"""Export a trained N2UQ checkpoint to integer inference formats and verify every export.

    python scripts/export.py --checkpoint models/resnet18_2bit.pth.tar --out exports/
    python scripts/export.py --checkpoint CKPT --out DIR --format onnx --data data/fashion_mnist --val_top1

The configuration (architecture, bits, downsample kind, classes) is inferred from the checkpoint
and the weights are loaded strictly. The model is converted to the integer model
(:mod:`n2uq.export.integer`) and written as

* ``onnx``: ``<tag>.onnx``, quantized convs as ``ConvInteger`` (runs in onnxruntime on CPU);
* ``qonnx``: ``<tag>.qonnx.onnx``, ``MultiThreshold`` nodes, static input shape of the check batch;
* ``packed``: ``<tag>.n2uq``, weight codes bit-packed at b bits (+ the size table).

Each is checked on a batch (random images, or images spread over ``--data``/val) against the
PyTorch fake-quant model and the integer model: codes layer by layer, logits, top-1; the
agreement is printed and the exit status is 1 if any check fails (2 for usage errors).
``--val_top1`` also compares the ONNX model's top-1 with the PyTorch model's over all of val/.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from n2uq.checkpoint import describe, load_model_state, load_state_dict_strict  # noqa: E402
from n2uq.cli import OneLineParser, UsageError, check_output_dir, check_ranges, run_main  # noqa: E402
from n2uq.data import DataError, image_folder, val_transform  # noqa: E402
from n2uq.export.graph import run_graph, trace_graph  # noqa: E402
from n2uq.export.integer import IntegerModel, convert  # noqa: E402
from n2uq.export.verify import Agreement, check_against_fake_quant, check_against_runtime  # noqa: E402
from scripts.model_zoo import build_model, evaluation_sizes  # noqa: E402

FORMATS = ("onnx", "qonnx", "packed")


def get_args_parser() -> OneLineParser:
    p = OneLineParser(description="Export an N2UQ checkpoint to ONNX / QONNX / bit-packed integer form "
                                  "and verify each export against the PyTorch model.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="N2UQ checkpoint (.pth.tar or state dict)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--format", default=",".join(FORMATS), help="comma-separated subset of onnx,qonnx,packed")
    p.add_argument("--data", default=None, metavar="DIR", help="ImageFolder root; the check batch comes from val/")
    p.add_argument("--batch_size", type=int, default=8, help="images in the check batch")
    p.add_argument("--image_size", type=int, default=None,
                   help="input size (default: the checkpoint's training args, else 224)")
    p.add_argument("--val_resize", type=int, default=None,
                   help="val resize before the center crop (default: from the checkpoint, else 256)")
    p.add_argument("--val_top1", action="store_true", help="also compare ONNX vs PyTorch top-1 on all of val/")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check batch")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def parse_formats(value: str) -> List[str]:
    formats = [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if not formats or bad:
        raise UsageError(f"--format {value!r}: expected a comma-separated subset of {','.join(FORMATS)}")
    return formats


def check_batch(args, dataset, image_size: int) -> torch.Tensor:
    if dataset is None:
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randn(args.batch_size, 3, image_size, image_size, generator=gen)
    # Images spread over the whole val set (so over the classes), deterministic.
    idx = np.linspace(0, len(dataset) - 1, num=min(args.batch_size, len(dataset))).astype(int)
    return torch.stack([dataset[int(i)][0] for i in idx])


def report(title: str, agreement: Agreement) -> bool:
    ok = agreement.ok()
    print(f"{title}: {'OK' if ok else 'FAILED'}")
    for line in agreement.lines():
        print(f"  {line}")
    return ok


def verify_onnx(int_model: IntegerModel, path: str, x: torch.Tensor, fq_logits: torch.Tensor) -> bool:
    import onnxruntime as ort

    from n2uq.export.onnx_export import export_onnx
    from n2uq.export.verify import compare_logits

    # The saved file gives the logits; a copy with every unit's codes as outputs gives the codes.
    saved = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(saved.run(["logits"], {"input": x.numpy()})[0])
    probe = ort.InferenceSession(export_onnx(int_model, expose_codes=True).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    names = [o.name for o in probe.get_outputs()]
    outs = dict(zip(names, probe.run(None, {"input": x.numpy()})))
    codes = {u.name: torch.from_numpy(outs[u.name].astype(np.int64)) for u in int_model.units()}
    ok = report("onnx (onnxruntime) vs integer model",
                check_against_runtime(int_model, x, logits, codes))
    vs_fq = compare_logits(logits, fq_logits)
    print(f"  onnx vs fake-quant, end to end: {vs_fq}")
    return ok


def verify_qonnx(int_model: IntegerModel, path: str, x: torch.Tensor) -> bool:
    from n2uq.export.qonnx_export import load_qonnx, run_qonnx

    names = [u.name for u in int_model.units()]
    logits, codes = run_qonnx(load_qonnx(path), x.numpy(), names)
    codes_t = {k: torch.from_numpy(v.astype(np.int64)) for k, v in codes.items()}
    return report("qonnx (qonnx executor) vs integer model",
                  check_against_runtime(int_model, x, torch.from_numpy(logits), codes_t))


def verify_packed(int_model: IntegerModel, path: str, x: torch.Tensor) -> bool:
    from n2uq.export.packing import load_packed

    loaded = load_packed(path)
    same = len(loaded.ops) == len(int_model.ops) and all(
        type(a) is type(b) and a.tensors().keys() == b.tensors().keys()
        and all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
        for a, b in zip(int_model.ops, loaded.ops))
    same_out = same and torch.equal(loaded(x), int_model(x))
    ok = same and same_out
    print(f"packed file round trip: {'OK' if ok else 'FAILED'} "
          f"(weight codes and all tensors identical: {same}; outputs identical: {same_out})")
    return ok


def val_top1(model: torch.nn.Module, int_model: IntegerModel, onnx_path: str, dataset, batch_size: int) -> bool:
    """Top-1 over all of val/: the fake-quant model (float32, and float64 to expose its own rounding
    flips), the PyTorch integer model and the ONNX file in onnxruntime.

    Passes when the ONNX top-1 equals the fake-quant top-1, or when every image on which their
    predictions differ is one on which the fake-quant model's float32 and float64 evaluations differ
    too (a float32 rounding flip of the PyTorch model, not an export error).
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    graph64 = trace_graph(copy.deepcopy(model).double())
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(batch_size, 64), shuffle=False)
    preds: dict = {"fq32": [], "fq64": [], "int": [], "onnx": []}
    labels = []
    with torch.no_grad():
        for images, target in loader:
            preds["fq32"].append(model(images).argmax(1))
            preds["fq64"].append(run_graph(graph64, images.double()).argmax(1))
            preds["int"].append(int_model(images).argmax(1))
            preds["onnx"].append(torch.from_numpy(sess.run(["logits"], {"input": images.numpy()})[0]).argmax(1))
            labels.append(target)
    p = {k: torch.cat(v) for k, v in preds.items()}
    y = torch.cat(labels)
    acc = {k: 100.0 * float((v == y).float().mean()) for k, v in p.items()}
    differ = p["onnx"] != p["fq32"]
    unexplained = int((differ & (p["fq32"] == p["fq64"])).sum())
    equal = acc["onnx"] == acc["fq32"]
    print(f"val top-1 over {len(y)} images: PyTorch fake-quant {acc['fq32']:.2f}%, ONNX (onnxruntime) "
          f"{acc['onnx']:.2f}% -> {'equal' if equal else 'DIFFERENT'}")
    print(f"  PyTorch fake-quant in float64 {acc['fq64']:.2f}%, PyTorch integer model {acc['int']:.2f}%; "
          f"ONNX vs fake-quant float32: {int(differ.sum())} predictions differ, {unexplained} of them where the "
          f"fake-quant model's float32 and float64 evaluations agree; ONNX vs float64: "
          f"{int((p['onnx'] != p['fq64']).sum())} differ")
    return equal or unexplained == 0


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    formats = parse_formats(args.format)
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"--checkpoint file not found: {args.checkpoint}")
    check_ranges({"--batch_size": args.batch_size, "--image_size": args.image_size, "--val_resize": args.val_resize})
    check_output_dir(args.out, "--out")
    if args.val_top1 and (args.data is None or "onnx" not in formats):
        raise UsageError("--val_top1 needs --data and the onnx format")
    if args.data is not None and not os.path.isdir(os.path.join(args.data, "val")):
        raise DataError(f"--data {args.data} has no val/ folder (expected an ImageFolder tree val/<class>/*)")

    state_dict, config, meta = load_model_state(args.checkpoint)
    if config.method != "n2uq":
        raise UsageError(f"{args.checkpoint} is a {config.method} model: integer export covers N2UQ models (LTQ "
                         f"activations, HardQuantizeConv weights) and their ablations, not the compared methods")
    image_size, val_resize = evaluation_sizes(meta, args.image_size, args.val_resize)
    model = build_model(config)
    load_state_dict_strict(model, state_dict, source=args.checkpoint)
    model.eval()
    print(f"checkpoint: {args.checkpoint} -> {describe(config)} ({config.tag})")

    dataset = None
    if args.data is not None:
        dataset = image_folder(args.data, "val", val_transform(image_size, val_resize))
        if len(dataset.classes) != config.num_classes:
            raise DataError(f"{args.data}/val has {len(dataset.classes)} classes, the model {config.num_classes}")
    x = check_batch(args, dataset, image_size)
    print(f"check batch: {tuple(x.shape)} {'from ' + args.data + '/val' if dataset is not None else 'random normal'}")

    start = time.time()
    int_model = convert(model, meta={**config.as_dict(), "tag": config.tag})
    s = int_model.summary()
    print(f"integer model: {s['threshold_units']} threshold units, {s['int_convs']} integer convs; "
          f"{s['streamlined_channels']}/{s['channels']} channels streamlined to integer thresholds, "
          f"{s['fallback_channels']} keep the float chain (negative PReLU slope) [{time.time() - start:.1f}s]")
    fq = check_against_fake_quant(model, int_model, x, yardstick=True)
    ok = report("integer model vs PyTorch fake-quant", fq)
    with torch.no_grad():
        fq_logits = model(x)

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, config.tag)
    if "onnx" in formats:
        from n2uq.export.onnx_export import export_onnx

        export_onnx(int_model, base + ".onnx")
        print(f"wrote {base}.onnx")
        ok &= verify_onnx(int_model, base + ".onnx", x, fq_logits)
    if "qonnx" in formats:
        from n2uq.export.qonnx_export import export_qonnx

        export_qonnx(int_model, list(x.shape), base + ".qonnx.onnx")
        print(f"wrote {base}.qonnx.onnx (input shape {list(x.shape)})")
        ok &= verify_qonnx(int_model, base + ".qonnx.onnx", x)
    if "packed" in formats:
        from n2uq.export.packing import save_packed, size_table

        stats = save_packed(int_model, base + ".n2uq")
        print(f"wrote {base}.n2uq")
        ok &= verify_packed(int_model, base + ".n2uq", x)
        print(size_table(model.state_dict(), stats, os.path.getsize(args.checkpoint)))
    if args.val_top1:
        ok &= val_top1(model, int_model, base + ".onnx", dataset, args.batch_size)
    if not ok:
        print("error: export verification failed (see FAILED above)", file=sys.stderr)
        return 1
    print("all exports verified")
    return 0


if __name__ == "__main__":
    run_main(main)
