"""Export a trained N2UQ checkpoint to integer inference formats and verify every export.

    python scripts/export.py --checkpoint models/resnet18_2bit.pth.tar --out exports/
    python scripts/export.py --checkpoint CKPT --out DIR --format onnx --data data/fashion_mnist --val_top1

The configuration (architecture, bits, downsample kind, classes) is inferred from the checkpoint
and the weights are loaded strictly. The model is converted to the integer model
(:mod:`n2uq.export.integer`) and written as

* ``onnx``: ``<tag>.onnx``, the exact export: quantized convs as ``ConvInteger`` (bit-exact codes;
  onnxruntime has no optimized kernel for it, so it runs slower than the float model);
* ``fast``: ``<tag>.fast.onnx``, the QDQ form onnxruntime runs on its 8-bit ``QLinearConv`` kernels
  (:mod:`n2uq.export.fast_onnx`; ``--fast_residual`` chooses how the convs feeding the residual
  stream run: ``int8``, fast, requantized over ranges calibrated on the check batch; or ``float``,
  exact);
* ``qonnx``: ``<tag>.qonnx.onnx``, ``MultiThreshold`` nodes, static input shape of the check batch;
* ``packed``: ``<tag>.n2uq``, weight codes bit-packed at b bits (+ the size table).

Each is checked on a batch (random images, or images spread over ``--data``/val) against the
PyTorch fake-quant model and the integer model: codes layer by layer, logits, top-1; the
agreement is printed and the exit status is 1 if any check fails (2 for usage errors).
``--val_top1`` also compares the ONNX models' top-1 with the PyTorch model's over all of val/.
Images are preprocessed as the checkpoint's training run recorded (``--image_size`` and
``--val_resize`` only for a file that records none; a contradicting value is refused), ``--data``'s
class folders must be the checkpoint's, and every file is written beside its name and renamed into
place, so an interrupted export never leaves a half-written file under a final name.
Every format's packages are checked before anything is written: a format asked for with
``--format`` whose package is missing is a usage error naming what to install; with the default
formats it is skipped with one line.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from n2uq.atomic_io import atomic_path  # noqa: E402
from n2uq.checkpoint import describe, load_model_state, load_state_dict_strict  # noqa: E402
from n2uq.cli import OneLineParser, UsageError, check_output_dir, check_ranges, run_main  # noqa: E402
from n2uq.data import DataError, image_folder, val_transform  # noqa: E402
from n2uq.export.graph import run_graph, trace_graph  # noqa: E402
from n2uq.export.integer import IntegerModel, convert  # noqa: E402
from n2uq.export.verify import Agreement, check_against_fake_quant, check_against_runtime  # noqa: E402
from scripts.evaluate import evaluation_settings  # noqa: E402
from scripts.model_zoo import build_model, check_classes  # noqa: E402

FORMATS = ("onnx", "fast", "qonnx", "packed")
#: Python packages each format needs (import name = pip name).
NEEDS = {"onnx": ("onnx", "onnxruntime"), "fast": ("onnx", "onnxruntime"), "qonnx": ("onnx", "qonnx"),
         "packed": ()}
#: Goal of the fast export on a validation set: top-1 within this many points of the PyTorch
#: fake-quant model, and at least this share of images with the same prediction.
FAST_TOP1_POINTS, FAST_SAME_SHARE = 0.1, 99.5


def get_args_parser() -> OneLineParser:
    p = OneLineParser(description="Export an N2UQ checkpoint to ONNX / QONNX / bit-packed integer form "
                                  "and verify each export against the PyTorch model.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="N2UQ checkpoint (.pth.tar or state dict)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--format", default=None,
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: all whose packages are installed)")
    p.add_argument("--fast_residual", choices=("int8", "float"), default="int8",
                   help="fast format: convs feeding the residual stream as 8-bit QLinearConv over ranges "
                        "calibrated on the check batch (fast), or as float32 Conv (exact)")
    p.add_argument("--data", default=None, metavar="DIR", help="ImageFolder root; the check batch comes from val/")
    p.add_argument("--batch_size", type=int, default=8, help="images in the check batch")
    p.add_argument("--image_size", type=int, default=None,
                   help="input size, for a file that records none (default 224; else the training run's)")
    p.add_argument("--val_resize", type=int, default=None,
                   help="resize before the center crop, for a file that records none (default 256; else "
                        "training's)")
    p.add_argument("--val_top1", action="store_true", help="also compare the ONNX files' top-1 with PyTorch's "
                                                            "on all of val/")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check batch")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def parse_formats(value: Optional[str]) -> List[str]:
    """The formats to write: ``--format`` (each one's packages must be installed), or every format
    whose packages are (the others skipped with one line each)."""
    formats = list(FORMATS) if value is None else [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if not formats or bad:
        raise UsageError(f"--format {value!r}: expected a comma-separated subset of {','.join(FORMATS)}")
    chosen = []
    for f in formats:
        missing = [m for m in NEEDS[f] if importlib.util.find_spec(m) is None]
        if missing and value is not None:
            raise UsageError(f"--format {f} needs the Python package(s) {', '.join(missing)}: "
                             f"pip install {' '.join(missing)}")
        if missing:
            print(f"skipping the {f} format: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
        else:
            chosen.append(f)
    return chosen


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


def write_fast(int_model: IntegerModel, path: str, x: torch.Tensor, residual: str) -> bool:
    """Write the fast (QDQ) file, its residual-stream ranges calibrated on ``x``, and check it on ``x``."""
    import onnxruntime as ort

    from n2uq.export.fast_onnx import export_fast
    from n2uq.export.verify import check_fast

    with atomic_path(path) as tmp:
        _, stats = export_fast(int_model, x, tmp, residual=residual)
    acc_units = [k for k, v in stats.items() if v["source"] == "acc"]
    on_8bit = [k for k in acc_units if stats[k]["windows"]]
    channels = sum(stats[k]["channels"] for k in on_8bit)
    windows = sum(stats[k]["windows"] for k in on_8bit)
    print(f"wrote {path} (QDQ; residual convs {residual}; {len(on_8bit)}/{len(acc_units)} quantizers after a "
          f"quantized conv read its 8-bit output, with {windows - channels} extra output windows over {channels} "
          f"channels; the others read a float32 conv)")
    probe, _ = export_fast(int_model, x, expose_codes=True, residual=residual)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x.numpy()})))
    codes = {u.name: torch.from_numpy(outs[u.name].astype(np.int64)) for u in int_model.units()}
    return report("fast onnx (onnxruntime) vs integer model",
                  check_fast(int_model, x, torch.from_numpy(outs["logits"]), codes, acc_units))


def val_top1(model: torch.nn.Module, int_model: IntegerModel, paths: dict, dataset, batch_size: int) -> bool:
    """Top-1 over all of val/: the fake-quant model (float32, and float64 to expose its own rounding
    flips), the PyTorch integer model and the ONNX files (``paths``: format -> file) in onnxruntime.

    The exact file (``onnx``) passes when its top-1 equals the fake-quant top-1, or when every image
    on which their predictions differ is one on which the fake-quant model's float32 and float64
    evaluations differ too (a float32 rounding flip of the PyTorch model, not an export error).
    The fast file passes when its top-1 is within ``FAST_TOP1_POINTS`` of the fake-quant model's
    and at least ``FAST_SAME_SHARE`` % of the images get the same prediction, or when it predicts
    exactly what the PyTorch integer model predicts on every image.
    """
    import onnxruntime as ort

    sessions = {f: ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for f, p in paths.items()}
    graph64 = trace_graph(copy.deepcopy(model).double())
    loader = torch.utils.data.DataLoader(dataset, batch_size=max(batch_size, 64), shuffle=False)
    preds: dict = {k: [] for k in ("fq32", "fq64", "int", *sessions)}
    labels = []
    with torch.no_grad():
        for images, target in loader:
            preds["fq32"].append(model(images).argmax(1))
            preds["fq64"].append(run_graph(graph64, images.double()).argmax(1))
            preds["int"].append(int_model(images).argmax(1))
            for f, sess in sessions.items():
                preds[f].append(torch.from_numpy(sess.run(["logits"], {"input": images.numpy()})[0]).argmax(1))
            labels.append(target)
    p = {k: torch.cat(v) for k, v in preds.items()}
    y = torch.cat(labels)
    acc = {k: 100.0 * float((v == y).float().mean()) for k, v in p.items()}
    print(f"val top-1 over {len(y)} images: PyTorch fake-quant {acc['fq32']:.2f}%, in float64 {acc['fq64']:.2f}%, "
          f"PyTorch integer model {acc['int']:.2f}%")
    ok = True
    if "onnx" in p:
        differ = p["onnx"] != p["fq32"]
        unexplained = int((differ & (p["fq32"] == p["fq64"])).sum())
        equal = acc["onnx"] == acc["fq32"]
        print(f"  ONNX exact export (onnxruntime) {acc['onnx']:.2f}% -> {'equal' if equal else 'DIFFERENT'}; "
              f"ONNX vs fake-quant float32: {int(differ.sum())} predictions differ, {unexplained} of them where the "
              f"fake-quant model's float32 and float64 evaluations agree; ONNX vs float64: "
              f"{int((p['onnx'] != p['fq64']).sum())} differ")
        ok &= equal or unexplained == 0
    if "fast" in p:
        same = 100.0 * float((p["fast"] == p["fq32"]).float().mean())
        as_int = bool((p["fast"] == p["int"]).all())
        passed = (abs(acc["fast"] - acc["fq32"]) <= FAST_TOP1_POINTS and same >= FAST_SAME_SHARE) or as_int
        int_same = 100.0 * float((p["int"] == p["fq32"]).float().mean())
        print(f"  fast export (onnxruntime) {acc['fast']:.2f}% ({acc['fast'] - acc['fq32']:+.2f} points), same "
              f"prediction as the fake-quant model on {same:.2f}% of the images (integer model: {int_same:.2f}%), "
              f"as the integer model on {'all' if as_int else 'not all'} -> {'OK' if passed else 'FAILED'} (goal: "
              f"within {FAST_TOP1_POINTS} points and >= {FAST_SAME_SHARE}% same, or every prediction the integer "
              f"model's)")
        ok &= passed
    return ok


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    formats = parse_formats(args.format)
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"--checkpoint file not found: {args.checkpoint}")
    check_ranges({"--batch_size": args.batch_size, "--image_size": args.image_size, "--val_resize": args.val_resize})
    check_output_dir(args.out, "--out")
    if args.val_top1 and (args.data is None or not {"onnx", "fast"} & set(formats)):
        raise UsageError("--val_top1 needs --data and the onnx or fast format")
    if args.data is not None and not os.path.isdir(os.path.join(args.data, "val")):
        raise DataError(f"--data {args.data} has no val/ folder (expected an ImageFolder tree val/<class>/*)")

    state_dict, config, meta = load_model_state(args.checkpoint)
    if config.method != "n2uq":
        raise UsageError(f"{args.checkpoint} is a {config.method} model: integer export covers N2UQ models (LTQ "
                         f"activations, HardQuantizeConv weights) and their ablations, not the compared methods")
    try:  # the preprocessing the checkpoint was trained with; a contradicting flag is refused
        settings = evaluation_settings(meta, args.image_size, args.val_resize)
    except UsageError as exc:
        raise UsageError(f"{args.checkpoint}: {exc}") from None
    image_size, val_resize = settings.image_size, settings.val_resize
    model = build_model(config)
    load_state_dict_strict(model, state_dict, source=args.checkpoint)
    model.eval()
    print(f"checkpoint: {args.checkpoint} -> {describe(config)} ({config.tag})")

    dataset = None
    if args.data is not None:
        dataset = image_folder(args.data, "val", val_transform(image_size, val_resize))
        check_classes(dataset.classes, os.path.join(args.data, "val"), config.num_classes, meta)
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

        with atomic_path(base + ".onnx") as tmp:
            export_onnx(int_model, tmp)
        print(f"wrote {base}.onnx")
        ok &= verify_onnx(int_model, base + ".onnx", x, fq_logits)
    if "fast" in formats:
        ok &= write_fast(int_model, base + ".fast.onnx", x, args.fast_residual)
    if "qonnx" in formats:
        from n2uq.export.qonnx_export import export_qonnx

        with atomic_path(base + ".qonnx.onnx") as tmp:
            export_qonnx(int_model, list(x.shape), tmp)
        print(f"wrote {base}.qonnx.onnx (input shape {list(x.shape)})")
        ok &= verify_qonnx(int_model, base + ".qonnx.onnx", x)
    if "packed" in formats:
        from n2uq.export.packing import save_packed, size_table

        with atomic_path(base + ".n2uq") as tmp:
            stats = save_packed(int_model, tmp)
        print(f"wrote {base}.n2uq")
        ok &= verify_packed(int_model, base + ".n2uq", x)
        print(size_table(model.state_dict(), stats, os.path.getsize(args.checkpoint)))
    if args.val_top1:
        paths = {f: base + suffix for f, suffix in (("onnx", ".onnx"), ("fast", ".fast.onnx")) if f in formats}
        ok &= val_top1(model, int_model, paths, dataset, args.batch_size)
    if not ok:
        print("error: export verification failed (see FAILED above)", file=sys.stderr)
        return 1
    print("all exports verified")
    return 0


if __name__ == "__main__":
    run_main(main)
