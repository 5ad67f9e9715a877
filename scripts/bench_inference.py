"""Inference speed in onnxruntime (CPU): float32 ONNX of a network, onnxruntime's own static int8
quantization of it, the exact N2UQ export (``ConvInteger``) and the fast N2UQ export (QDQ →
``QLinearConv``), side by side in one run (``scripts/benchmark.py --mode inference``).

Every variant runs once per round, one after another (interleaved, so load on the shared machine
hits them alike); the table gives each variant's fastest round and its ratio to the float32 model's
fastest round. Models use random weights (the speed does not depend on them): the N2UQ model gets
generated trained-looking quantizer parameters (``n2uq.export.synthetic``), the float model
torchvision's layout with 1000 classes. With ``--checkpoint`` the N2UQ model is that trained
model (its classes also set the float model's).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections import Counter
from typing import Dict, List, Tuple

import numpy as np
import torch

from n2uq.checkpoint import ModelConfig, describe, load_model_state, load_state_dict_strict
from n2uq.cli import UsageError
from n2uq.export.fast_onnx import export_fast
from n2uq.export.integer import convert
from n2uq.export.onnx_export import export_onnx
from n2uq.export.synthetic import randomize_
from scripts.model_zoo import build_full_precision, build_model

__all__ = ["INFERENCE_DEFAULTS", "check_inference_args", "inference_mode", "build_variants", "fused_ops",
           "processor_name"]

CALIBRATION_IMAGES = 8
#: The generated model without ``--checkpoint`` (flag destinations).
INFERENCE_DEFAULTS = {"arch": "resnet18", "inference_bits": 2, "quantize_downsample": 0}


def check_inference_args(args: argparse.Namespace) -> None:
    """Validate ``--mode inference``'s flags before anything is built: the device, and with
    ``--checkpoint`` the file (an N2UQ model; ``--arch``, ``--inference-bits``, ``--quantize-downsample``
    only when they agree with what it records). Fills in the model's settings (``args.arch``,
    ``args.inference_bits``, ``args.quantize_downsample``) and ``args.loaded`` (the file's state dict
    and configuration, or ``None``)."""
    if args.device is not None and args.device != "cpu":
        raise UsageError("--mode inference measures onnxruntime on the CPU; use --device cpu")
    args.loaded = None
    if not args.checkpoint:
        for key, value in INFERENCE_DEFAULTS.items():
            setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
        return
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"--checkpoint file not found: {args.checkpoint}")
    state_dict, config, _ = load_model_state(args.checkpoint)
    if config.method != "n2uq":
        raise UsageError(f"{args.checkpoint} is a {config.method} model: the inference benchmark exports N2UQ "
                         f"models (LTQ activations, HardQuantizeConv weights), not the compared methods")
    recorded = {"arch": config.arch, "inference_bits": config.n_bit,
                "quantize_downsample": int(config.quantize_downsample)}
    for key, value in recorded.items():
        given = getattr(args, key)
        if given is not None and given != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {given} contradicts {args.checkpoint} ({describe(config)}); leave {flag} out "
                             f"with --checkpoint")
        setattr(args, key, value)
    args.loaded = (state_dict, config)


def processor_name() -> str:
    """The CPU's name: ``platform.processor()``, else the ``model name`` of /proc/cpuinfo (Linux), else ''."""
    name = platform.processor()
    if name and name not in ("x86_64", "aarch64", "arm64", "i386", "i686"):
        return name
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def _float_onnx(arch: str, path: str, size: int, classes: int) -> None:
    model = build_full_precision(arch, classes).eval()
    torch.onnx.export(model, torch.randn(1, 3, size, size), path, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})


def _quantize_static(float_path: str, path: str, images: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    prepared = path + ".prepared.onnx"  # onnxruntime's recommended pre-processing (folds BN, shapes)
    quant_pre_process(float_path, prepared)
    # uint8 activations, int8 weights: the x86 fast path (quantize_static's default int8 activations
    # leave 11 of ResNet-18's 20 convs in float32 and run no faster than the float model)
    quantize_static(prepared, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def build_variants(args: argparse.Namespace, folder: str) -> List[Tuple[str, str]]:
    """``[(label, onnx path)]`` of the compared models, written to ``folder``."""
    size = args.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(CALIBRATION_IMAGES, 3, size, size, generator=gen)
    variants = []
    if getattr(args, "loaded", None):  # a trained model: its thresholds decide how many 8-bit windows it needs
        state_dict, config = args.loaded
        model = build_model(config).eval()
        load_state_dict_strict(model, state_dict, source=args.checkpoint)
    else:
        config = ModelConfig(args.arch, args.bits, bool(args.quantize_downsample), 1000)
        model = build_model(config).eval()
        randomize_(model, images[:4], seed=0, negative_slope_fraction=0.0)  # trained models: slopes >= 0
    fp = os.path.join(folder, "float32.onnx")
    _float_onnx(config.arch, fp, size, config.num_classes)
    variants.append(("float32 ONNX (torchvision layout)", fp))
    int8 = os.path.join(folder, "ort_int8.onnx")
    _quantize_static(fp, int8, images.numpy())
    variants.append(("onnxruntime quantize_static int8 (QDQ, u8 activations, per-channel s8 weights)", int8))
    int_model = convert(model, meta={**config.as_dict(), "tag": config.tag})
    exact = os.path.join(folder, "n2uq_exact.onnx")
    export_onnx(int_model, exact)
    variants.append((f"N2UQ {config.tag}: exact export (ConvInteger)", exact))
    for residual in ("float", "int8"):
        fast = os.path.join(folder, f"n2uq_fast_{residual}.onnx")
        export_fast(int_model, images, fast, residual=residual)
        variants.append((f"N2UQ {config.tag}: fast export, {residual} residual convs", fast))
    if config.n_bit <= 3:
        fast4 = os.path.join(folder, "n2uq_fast_int4.onnx")
        export_fast(int_model, images, fast4, weight_type="int4", residual="int8")
        variants.append((f"N2UQ {config.tag}: fast export, int8 residual, INT4 weights", fast4))
    return variants


def fused_ops(path: str, threads: int) -> Counter:
    """Op types of the graph onnxruntime actually runs (after its optimizations)."""
    import onnx
    import onnxruntime as ort

    opt = path + ".optimized.onnx"
    options = _options(threads)
    options.optimized_model_filepath = opt
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(opt).graph.node)


def _options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def _time_interleaved(sessions: Dict[str, object], x: np.ndarray, rounds: int, warmup: int) -> Dict[str, float]:
    best = {k: float("inf") for k in sessions}
    for r in range(warmup + rounds):
        for label, sess in sessions.items():
            start = time.perf_counter()
            sess.run(["logits"], {"input": x})
            if r >= warmup:
                best[label] = min(best[label], time.perf_counter() - start)
    return best


def inference_mode(args: argparse.Namespace, device: torch.device) -> None:
    import onnxruntime as ort

    if device.type != "cpu":
        raise UsageError("--mode inference measures onnxruntime on the CPU; use --device cpu")
    threads = args.threads or os.cpu_count()
    what = args.checkpoint or (f"{args.arch} W{args.bits}A{args.bits} qd{int(args.quantize_downsample)} "
                               "(generated weights)")
    print(f"\n== inference: {what}, "
          f"{args.image_size}x{args.image_size}, onnxruntime {ort.__version__} CPU, {threads} threads, "
          f"fastest of {args.rounds} interleaved rounds ({args.warmup} warm-up)"
          + (f"; {processor_name()}" if processor_name() else ""))
    with tempfile.TemporaryDirectory() as folder:
        variants = build_variants(args, folder)
        sessions = {label: ort.InferenceSession(path, _options(threads), providers=["CPUExecutionProvider"])
                    for label, path in variants}
        sizes = {label: os.path.getsize(path) for label, path in variants}
        kernels = {label: fused_ops(path, threads) for label, path in variants}
        results = {}
        for batch in args.inference_batch_sizes:
            x = np.random.default_rng(0).standard_normal((batch, 3, args.image_size, args.image_size),
                                                         dtype=np.float32)
            results[batch] = _time_interleaved(sessions, x, args.rounds, args.warmup)
    header = "| model | " + " | ".join(f"batch {b} ms | ÷ float32" for b in results) + " | file MB | convs run as |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(results) + 1))
    fp_label = variants[0][0]
    for label, _ in variants:
        cells = []
        for best in results.values():
            cells += [f"{best[label] * 1e3:.1f}", f"{best[label] / best[fp_label]:.2f}×"]
        k = kernels[label]
        conv_kinds = ", ".join(f"{k[t]} {t}" for t in ("QLinearConv", "ConvInteger", "Conv", "FusedConv") if k[t])
        print(f"| {label} | " + " | ".join(cells) + f" | {sizes[label] / 1e6:.1f} | {conv_kinds} |")
    if args.plot:
        _plot(results, [v[0] for v in variants], args.plot)
        print(f"wrote {args.plot}")


def _plot(results: Dict[int, Dict[str, float]], labels: List[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one set of (wrapped) labels, on the left panel; the panels share the rows
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 + 3.6 * len(results), 3.8), squeeze=False, sharey=True)
    for column, (ax, (batch, best)) in enumerate(zip(axes[0], results.items())):
        fp = best[labels[0]]
        ratios = [best[k] / fp for k in labels]
        ax.barh(range(len(labels)), ratios, color=["#888", "#4a7", "#c44", "#36c", "#69d", "#9bf"][:len(labels)])
        if column == 0:
            ax.set_yticks(range(len(labels)), [k.replace(": ", ":\n").replace(" (", "\n(") for k in labels],
                          fontsize=7)
            ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        for i, r in enumerate(ratios):
            ax.text(r, i, f" {r:.2f}× ({best[labels[i]] * 1e3:.0f} ms)", va="center", fontsize=7)
        ax.set_xlabel("time ÷ float32 ONNX (lower is faster)")
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.set_xlim(0, max(ratios) * 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
