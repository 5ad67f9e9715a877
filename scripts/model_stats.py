"""What a model costs, counted: per conv/fc layer and in total the parameters, weight and activation
bits, MACs and BOPs (bit operations, ``MACs × b_w × b_a``, the measure quantization papers report),
and the bytes its weights take in each export format.

    python scripts/model_stats.py resnet18 --bits 2                 # N2UQ W2A2 and the float model
    python scripts/model_stats.py models/<run>/model_best.pth.tar   # a checkpoint's configuration
    python scripts/model_stats.py CKPT --files                      # + the real file sizes

MACs are counted per image at ``--image_size`` (default: the checkpoint's evaluation size, else
224). A quantized conv (N2UQ's ``HardQuantizeConv``; the compared methods' ``LSQConv``,
``DoReFaConv``) has ``b_w = b_a = B``; the first conv, the FP downsample convs and ``fc`` are full
precision (32 × 32 bits). Bytes per format: ``fp32`` 4 per weight; ``onnx`` (the exact ONNX export)
1 per quantized weight code (int8) and 4 per float weight; ``fast`` at least that (``≥``: the fast
file adds output-window copies of some convs and keeps some convs' weights in float32; ``--files``
gives its size); ``packed`` (``.n2uq``) ``B/8`` per quantized weight code. A format that cannot take
the model (more than 7 weight bits for ONNX; a compared method for every integer export) shows
``—`` and the reason. ``--files`` writes the exports to a temporary folder and lists their real
sizes (thresholds, BN factors and the ONNX structure included).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from n2uq.baselines import DoReFaConv, LSQConv  # noqa: E402
from n2uq.bitwidth import MAX_BITS, MIN_BITS  # noqa: E402
from n2uq.checkpoint import ModelConfig, load_model_state, load_state_dict_strict  # noqa: E402
from n2uq.cli import OneLineParser, UsageError, check_ranges, run_main  # noqa: E402
from n2uq.export.limits import format_limits  # noqa: E402
from n2uq.quant import HardQuantizeConv  # noqa: E402
from scripts.model_zoo import ARCH_NAMES, build_full_precision, build_model, evaluation_sizes  # noqa: E402

FORMAT_COLUMNS = ("fp32", "onnx", "fast", "packed")
#: Quantized convs of N2UQ and of the compared methods (``n_bit`` weight and input bits).
QUANTIZED_CONVS = (HardQuantizeConv, LSQConv, DoReFaConv)
#: How a figure is shown when it is a lower bound.
AT_LEAST = {"fast": "≥"}


def get_args_parser() -> OneLineParser:
    p = OneLineParser(description="Parameters, bits, MACs, BOPs and bytes per export format of an N2UQ model, "
                                  "per layer and in total.")
    p.add_argument("model", metavar="CHECKPOINT_OR_ARCH", help=f"a checkpoint file, or one of {', '.join(ARCH_NAMES)}")
    p.add_argument("--bits", type=int, default=None, help="W/A bits (with an architecture name; default 2)")
    p.add_argument("--quantize_downsample", type=int, choices=(0, 1), default=None,
                   help="with a ResNet name: quantized (1) or full-precision (0, default) downsample")
    p.add_argument("--num_classes", type=int, default=None, help="with an architecture name (default 1000)")
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
            quantized = isinstance(module, QUANTIZED_CONVS)
            bits = module.n_bit if quantized else 32
            params = sum(p.numel() for n, p in module.named_parameters(recurse=False) if n in ("weight", "bias"))
            weights = w.numel()
            macs = outputs * per_output
            rows.append({"layer": name, "params": params, "b_w": bits, "b_a": bits, "macs": macs,
                         "bops": macs * bits * bits,
                         "fp32": 4 * params,
                         "onnx": (weights if quantized else 4 * weights) + 4 * (params - weights),
                         "fast": (weights if quantized else 4 * weights) + 4 * (params - weights),
                         "packed": (weights * bits / 8 if quantized else 4 * weights) + 4 * (params - weights)})
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, *QUANTIZED_CONVS)):
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


def cell(row: Dict, column: str, unavailable: Dict[str, str]) -> str:
    """A bytes figure: ``—`` for a format that cannot take the model, ``≥`` before a lower bound."""
    return "—" if unavailable.get(column) else AT_LEAST.get(column, "") + fmt(row[column])


def print_table(title: str, rows: List[Dict], model: nn.Module, per_layer: bool,
                unavailable: Dict[str, str]) -> Dict:
    t = totals(rows, model)
    print(f"\n{title}")
    print("| layer | params | b_w/b_a | MACs | BOPs | " + " | ".join(f"{c} bytes" for c in FORMAT_COLUMNS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(FORMAT_COLUMNS))
    for r in rows if per_layer else []:
        print(f"| {r['layer']} | {fmt(r['params'])} | {r['b_w']}/{r['b_a']} | {fmt(r['macs'])} | {fmt(r['bops'])} | "
              + " | ".join(cell(r, c, unavailable) for c in FORMAT_COLUMNS) + " |")
    print(f"| **total (conv + fc)** | {fmt(t['params'])} | | {fmt(t['macs'])} | {fmt(t['bops'])} | "
          + " | ".join(cell(t, c, unavailable) for c in FORMAT_COLUMNS) + " |")
    print(f"all parameters (BN, biases, quantizer parameters included): {fmt(t['all_params'])}; MACs in quantized "
          f"convs: {fmt(t['quantized_macs'])} of {fmt(t['macs'])}")
    return t


def unavailable_formats(model: nn.Module, config: ModelConfig) -> Dict[str, str]:
    """Per export format, why it cannot take the model (absent when it can)."""
    if config.method != "n2uq":
        reason = f"integer export covers N2UQ models, not {config.method}"
        return {f: reason for f in ("onnx", "fast", "packed")}
    return {f: why for f, why in format_limits(model).items() if why}


def file_sizes(model: nn.Module, config: ModelConfig, image_size: int, unavailable: Dict[str, str]) -> Dict[str, int]:
    from n2uq.export.integer import convert
    from n2uq.export.packing import save_packed

    int_model = convert(model, meta={**config.as_dict(), "tag": config.tag})
    images = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        if "onnx" not in unavailable:
            from n2uq.export.onnx_export import export_onnx

            paths["exact.onnx"] = os.path.join(folder, "exact.onnx")
            export_onnx(int_model, paths["exact.onnx"])
        if "fast" not in unavailable:
            from n2uq.export.fast_onnx import export_fast

            paths["fast.onnx"] = os.path.join(folder, "fast.onnx")
            export_fast(int_model, images, paths["fast.onnx"])
        paths["model.n2uq"] = os.path.join(folder, "model.n2uq")
        save_packed(int_model, paths["model.n2uq"])
        return {name: os.path.getsize(p) for name, p in paths.items()}


def model_from_args(args):
    """``(model, config, image size)`` of a checkpoint (flags that contradict it refused) or an
    architecture name."""
    if os.path.isfile(args.model):
        if args.bits is not None:
            raise UsageError("--bits goes with an architecture name; a checkpoint records its own bits")
        state_dict, config, meta = load_model_state(args.model)
        recorded = {"--quantize_downsample": (args.quantize_downsample, int(config.quantize_downsample)),
                    "--num_classes": (args.num_classes, config.num_classes)}
        for flag, (given, value) in recorded.items():
            if given is not None and given != value:
                raise UsageError(f"{flag} {given} contradicts {args.model}, which records {value}; leave {flag} out "
                                 f"with a checkpoint")
        model = build_model(config)
        load_state_dict_strict(model, state_dict, source=args.model)
        return model, config, args.image_size or evaluation_sizes(meta)[0]
    if args.model not in ARCH_NAMES:
        raise UsageError(f"{args.model!r} is neither a file nor an architecture ({', '.join(ARCH_NAMES)})")
    if args.model == "mobilenetv2" and args.quantize_downsample is not None:
        raise UsageError("--quantize_downsample applies to the ResNets; mobilenetv2 has no downsample convs")
    config = ModelConfig(args.model, args.bits or 2, bool(args.quantize_downsample),
                         args.num_classes or 1000)
    return build_model(config), config, args.image_size or 224


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    check_ranges({"--num_classes": args.num_classes, "--image_size": args.image_size})
    if args.bits is not None and not MIN_BITS <= args.bits <= MAX_BITS:
        raise UsageError(f"--bits must be in {MIN_BITS}..{MAX_BITS}, got {args.bits}")
    model, config, image_size = model_from_args(args)
    unavailable = unavailable_formats(model, config)
    if args.files and config.method != "n2uq":
        raise UsageError(f"--files writes the integer exports, which cover N2UQ models, not {config.method}")
    rows = layer_stats(model, image_size)
    t = print_table(f"{config.tag} ({config.method_tag}), {image_size}x{image_size}, per image", rows, model,
                    args.per_layer, unavailable)
    for f in FORMAT_COLUMNS:
        if f in unavailable:
            print(f"{f} bytes: — ({unavailable[f]})")
    if config.arch != "mobilenetv2":
        fp = build_full_precision(config.arch, config.num_classes)
        f = print_table(f"full-precision {config.arch} (torchvision), {image_size}x{image_size}",
                        layer_stats(fp, image_size), fp, args.per_layer,
                        {c: "full precision" for c in FORMAT_COLUMNS if c != "fp32"})
        ratios = [f"{f['fp32'] / t[c]:.1f}x {name}" for c, name in (("packed", "fewer packed"), ("onnx", "in ONNX"))
                  if c not in unavailable]
        print(f"\n{config.tag} vs full precision: BOPs {f['bops'] / t['bops']:.1f}x fewer"
              + (f", weight bytes {', '.join(ratios)}" if ratios else ""))
    if args.files:
        sizes = file_sizes(model.eval(), config, image_size, unavailable)
        print("files: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
              + f" (float32 weights {t['all_params'] * 4 / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    run_main(main)
