"""The checks of ``scripts/export.py``: each written file against the PyTorch model and the integer
model on the check batch, and (``--val_top1``) the ONNX files' top-1 over all of val/.

A check prints ``OK``, ``FAILED`` or, for a lossy fast file (``--fast_residual int8``: the residual
stream requantized to 8 bits), ``APPROXIMATE`` with its end-to-end agreement on the check batch;
an approximate file is never called verified unless ``--val_top1`` measured it within its goal.
"""

from __future__ import annotations

import copy
from typing import Tuple, Union

import numpy as np
import torch

from n2uq.atomic_io import atomic_path
from n2uq.export.graph import run_graph, trace_graph
from n2uq.export.integer import IntegerModel
from n2uq.export.verify import Agreement, FastAgreement, check_against_runtime

__all__ = ["FAST_TOP1_POINTS", "FAST_SAME_SHARE", "spread_images", "report", "verify_onnx", "verify_qonnx",
           "verify_packed", "write_fast", "val_top1"]

#: Goal of the fast export on a validation set: top-1 within this many points of the PyTorch
#: fake-quant model, and at least this share of images with the same prediction.
FAST_TOP1_POINTS, FAST_SAME_SHARE = 0.1, 99.5


def spread_images(dataset, count: int) -> torch.Tensor:
    """``count`` images spread over the whole of ``dataset`` (so over its classes), deterministic."""
    idx = np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).astype(int)
    return torch.stack([dataset[int(i)][0] for i in idx])


def report(title: str, agreement: Union[Agreement, FastAgreement]) -> bool:
    """Print the check's status line and its agreement lines; whether the exact parts agree."""
    ok = agreement.ok()
    status = agreement.status() if isinstance(agreement, FastAgreement) else "OK" if ok else "FAILED"
    print(f"{title}: {status}")
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


def write_fast(int_model: IntegerModel, path: str, x: torch.Tensor, fq_logits: torch.Tensor, residual: str,
               calibration: torch.Tensor, calibration_what: str) -> Tuple[bool, bool]:
    """Write the fast (QDQ) file, its residual-stream ranges calibrated on ``calibration`` (described by
    ``calibration_what``), and check it on ``x`` (``fq_logits``: the PyTorch model's logits on ``x``).

    Returns ``(exact parts agree, the file is approximate)``."""
    import onnxruntime as ort

    from n2uq.export.fast_onnx import export_fast, requantized_convs
    from n2uq.export.verify import check_fast

    with atomic_path(path) as tmp:
        proto, stats = export_fast(int_model, calibration, tmp, residual=residual)
    requantized = requantized_convs(proto)
    acc_units = [k for k, v in stats.items() if v["source"] == "acc"]
    on_8bit = [k for k in acc_units if stats[k]["windows"]]
    channels = sum(stats[k]["channels"] for k in on_8bit)
    windows = sum(stats[k]["windows"] for k in on_8bit)
    residual_text = (f"{requantized} residual convs int8 over ranges calibrated on {calibration_what}"
                     if requantized else f"residual convs {residual}")
    print(f"wrote {path} (QDQ; {residual_text}; {len(on_8bit)}/{len(acc_units)} quantizers after a "
          f"quantized conv read its 8-bit output, with {windows - channels} extra output windows over {channels} "
          f"channels; the others read a float32 conv)")
    probe, _ = export_fast(int_model, calibration, expose_codes=True, residual=residual)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x.numpy()})))
    codes = {u.name: torch.from_numpy(outs[u.name].astype(np.int64)) for u in int_model.units()}
    agreement = check_fast(int_model, x, torch.from_numpy(outs["logits"]), codes, acc_units, requantized, fq_logits)
    ok = report("fast onnx (onnxruntime) vs integer model", agreement)
    if ok and agreement.approximate:
        print("  (lossy by design: the exact parts agree; the check batch only samples the agreement: "
              "--data DIR --val_top1 measures it over a validation set)")
    return ok, agreement.approximate


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
