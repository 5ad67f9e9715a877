"""What a model costs, counted: per conv/fc layer and in total the parameters, weight and activation
bits, MACs and BOPs (bit operations, ``MACs × b_w × b_a``, the measure quantization papers report),
and the bytes its weights take in each export format.

    python scripts/model_stats.py resnet18 --bits 2                 # N2UQ W2A2 and the float model
    python scripts/model_stats.py models/<run>/model_best.pth.tar   # a checkpoint's configuration
    python scripts/model_stats.py CKPT --files                      # + the real file sizes

MACs are counted per image at ``--image_size`` (default: the checkpoint's evaluation size, else
224). A quantized conv (``HardQuantizeConv``) has ``b_w = b_a = B``; the first conv, the FP
downsample convs and ``fc`` are full precision (32 × 32 bits). Bytes per format: ``fp32`` 4 per
weight; ``onnx``/``fast`` (the exact and the fast ONNX exports) 1 per quantized weight code (int8)
and 4 per float weight; ``packed`` (``.n2uq``) ``B/8`` per quantized weight code. ``--files`` writes
the exports to a temporary folder and lists their real sizes (thresholds, BN factors and the ONNX
structure included).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from n2uq.checkpoint import ModelConfig, load_model_state, load_state_dict_strict  # noqa: E402
from n2uq.cli import OneLineParser, UsageError, check_ranges, run_main  # noqa: E402
from n2uq.quant import HardQuantizeConv  # noqa: E402
from scripts.model_zoo import ARCH_NAMES, build_full_precision, build_model, evaluation_sizes  # noqa: E402

FORMAT_COLUMNS = ("fp32", "onnx/fast", "packed")


def get_args_parser() -> OneLineParser:
    p = OneLineParser(description="Parameters, bits, MACs, BOPs and bytes per export format of an N2UQ model, "
                                  "per layer and in total.")
    p.add_argument("model", metavar="CHECKPOINT_OR_ARCH", help=f"a checkpoint file, or one of {', '.join(ARCH_NAMES)}")
    p.add_argument("--bits", type=int, default=None, help="W/A bits (with an architecture name; default 2)")
    p.add_argument("--quantize_downsample", type=int, choices=(0, 1), default=0,
                   help="with an architecture name: quantized (1) or full-precision (0) downsample")
    p.add_argument("--num_classes", type=int, default=1000, help="with an architecture name")
    p.add_argument("--image_size", type=int, default=None, help="input side (default: checkpoint's, else 224)")
    p.add_argument("--per_layer", action="store_true", help="print every conv/fc layer")
    p.add_argument("--files", action="store_true", help="also write the exports and list their real sizes")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def layer_stats(model: nn.Module, image_size: int) -> List[Dict]:
    """One row per conv/linear layer: name, params, b_w, b_a, MACs (per image), BOPs, bytes per format."""
    rows: List[Dict] = []
    hooks = []

    def record(name):
        def hook(module, inputs, out):
            w = module.weight
            per_output = w[0].numel()  # C_in/groups · kh · kw (conv) or C_in (linear)
            outputs = out[0].numel()  # one image
            quantized = isinstance(module, HardQuantizeConv)
            bits = module.num_bits if quantized else 32
            params = sum(p.numel() for n, p in module.named_parameters(recurse=False) if n in ("weight", "bias"))
            weights = w.numel()
            macs = outputs * per_output
            rows.append({"layer": name, "params": params, "b_w": bits, "b_a": bits, "macs": macs,
                         "bops": macs * bits * bits,
                         "fp32": 4 * params,
                         "onnx/fast": (weights if quantized else 4 * weights) + 4 * (params - weights),
                         "packed": (weights * bits / 8 if quantized else 4 * weights) + 4 * (params - weights)})
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, HardQuantizeConv)):
            hooks.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    return rows


def totals(rows: List[Dict], model: nn.Module) -> Dict:
    out = {k: sum(r[k] for r in rows) for k in ("params", "macs", "bops", *FORMAT_COLUMNS)}
    out["all_params"] = sum(p.numel() for p in model.parameters())
    out["quantized_macs"] = sum(r["macs"] for r in rows if r["b_w"] < 32)
    return out


def fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def print_table(title: str, rows: List[Dict], model: nn.Module, per_layer: bool) -> Dict:
    t = totals(rows, model)
    print(f"\n{title}")
    print("| layer | params | b_w/b_a | MACs | BOPs | " + " | ".join(f"{c} bytes" for c in FORMAT_COLUMNS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(FORMAT_COLUMNS))
    for r in rows if per_layer else []:
        print(f"| {r['layer']} | {fmt(r['params'])} | {r['b_w']}/{r['b_a']} | {fmt(r['macs'])} | {fmt(r['bops'])} | "
              + " | ".join(fmt(r[c]) for c in FORMAT_COLUMNS) + " |")
    print(f"| **total (conv + fc)** | {fmt(t['params'])} | | {fmt(t['macs'])} | {fmt(t['bops'])} | "
          + " | ".join(fmt(t[c]) for c in FORMAT_COLUMNS) + " |")
    print(f"all parameters (BN, biases, quantizer parameters included): {fmt(t['all_params'])}; MACs in quantized "
          f"convs: {fmt(t['quantized_macs'])} of {fmt(t['macs'])}")
    return t


def file_sizes(model: nn.Module, config: ModelConfig, image_size: int) -> Dict[str, int]:
    from n2uq.export.fast_onnx import export_fast
    from n2uq.export.integer import convert
    from n2uq.export.onnx_export import export_onnx
    from n2uq.export.packing import save_packed

    int_model = convert(model, meta={**config.as_dict(), "tag": config.tag})
    images = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        paths = {name: os.path.join(folder, name) for name in ("exact.onnx", "fast.onnx", "model.n2uq")}
        export_onnx(int_model, paths["exact.onnx"])
        export_fast(int_model, images, paths["fast.onnx"])
        save_packed(int_model, paths["model.n2uq"])
        return {name: os.path.getsize(p) for name, p in paths.items()}


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    check_ranges({"--bits": args.bits, "--num_classes": args.num_classes, "--image_size": args.image_size})
    if os.path.isfile(args.model):
        if args.bits is not None:
            raise UsageError("--bits goes with an architecture name; a checkpoint records its own bits")
        state_dict, config, meta = load_model_state(args.model)
        model = build_model(config)
        load_state_dict_strict(model, state_dict, source=args.model)
        image_size = args.image_size or evaluation_sizes(meta)[0]
    elif args.model in ARCH_NAMES:
        config = ModelConfig(args.model, args.bits or 2, bool(args.quantize_downsample), args.num_classes)
        model, image_size = build_model(config), args.image_size or 224
    else:
        raise UsageError(f"{args.model!r} is neither a file nor an architecture ({', '.join(ARCH_NAMES)})")
    rows = layer_stats(model, image_size)
    t = print_table(f"{config.tag} ({config.method_tag}), {image_size}x{image_size}, per image", rows, model,
                    args.per_layer)
    if config.arch != "mobilenetv2":
        fp = build_full_precision(config.arch, config.num_classes)
        f = print_table(f"full-precision {config.arch} (torchvision), {image_size}x{image_size}",
                        layer_stats(fp, image_size), fp, args.per_layer)
        print(f"\n{config.tag} vs full precision: BOPs {f['bops'] / t['bops']:.1f}x fewer, "
              f"weight bytes {f['fp32'] / t['packed']:.1f}x fewer packed, {f['fp32'] / t['onnx/fast']:.1f}x in ONNX")
    if args.files:
        sizes = file_sizes(model.eval(), config, image_size)
        print("files: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
              + f" (float32 weights {t['all_params'] * 4 / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    run_main(main)
