"""Picture what N2UQ learned: each LTQ's input thresholds against the uniform grid.

    python scripts/show_thresholds.py --data data/fashion_mnist --out thresholds.png \\
        --checkpoint models/demo/fashion_mnist_8ep/resnet18_2bit_quantize_downsample_False/model_best.pth.tar

For a few LTQ layers (``--layers``, default four spread over the depth) one panel each, on the
quantizer's scaled input ``scale1·x``: the learned thresholds (solid), the uniform thresholds over
the same range ``[d0, dn]`` (dashed), the output staircase (uniform levels ``L[m]·scale2``, right
axis) and, with ``--data``, the histogram of the values the layer receives on validation images —
the paper's Figure-1 idea (non-uniform thresholds, uniform outputs) from a real checkpoint.
Needs matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from n2uq import LTQ  # noqa: E402
from n2uq import data as D  # noqa: E402
from n2uq.cli import OneLineParser, UsageError, check_output_dir, check_ranges, run_main  # noqa: E402
from scripts.model_zoo import evaluation_sizes, load_checkpoint_model  # noqa: E402


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="show_thresholds.py", description="Plot the learned LTQ thresholds of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="an N2UQ checkpoint (this project's or a released one)")
    p.add_argument("--data", default=None, help="ImageFolder root: also plot each layer's input histogram")
    p.add_argument("--split", default="val", help="sub-folder of --data to draw the inputs from")
    p.add_argument("--images", type=int, default=256, help="how many images to feed for the histograms")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="LTQ module names, e.g. layer1.0.quan1 (default: four spread over the depth)")
    p.add_argument("--out", default="thresholds.png", help="PNG file to write")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def pick_layers(model: torch.nn.Module, names: Optional[List[str]], count: int = 4) -> Dict[str, LTQ]:
    """``names`` (checked), or ``count`` LTQ layers evenly spread over the model's depth."""
    ltqs = {name: m for name, m in model.named_modules() if isinstance(m, LTQ)}
    if not ltqs:
        raise UsageError("the checkpoint has no LTQ layer (a model of another method?): nothing to show")
    if names:
        unknown = [n for n in names if n not in ltqs]
        if unknown:
            raise UsageError(f"no LTQ layer named {', '.join(unknown)}; e.g. {', '.join(list(ltqs)[:4])}")
        return {n: ltqs[n] for n in names}
    keys = list(ltqs)
    picks = sorted({round(i * (len(keys) - 1) / max(count - 1, 1)) for i in range(count)})
    return {keys[i]: ltqs[keys[i]] for i in picks}


def collect_inputs(model: torch.nn.Module, layers: Dict[str, LTQ], loader, limit: int) -> Dict[str, Tensor]:
    """The scaled inputs ``scale1·x`` each layer receives (forward pre-hooks: the layers then run
    module by module), on up to ``limit`` images."""
    seen: Dict[str, List[Tensor]] = {name: [] for name in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen[name].append(
        (inp[0].detach() * mod.scale1.detach()).flatten().float())) for name, m in layers.items()]
    count = 0
    try:
        with torch.no_grad():
            for batch in loader:
                images, _, _ = D.split_batch(batch)
                model(images)
                count += len(images)
                if count >= limit:
                    break
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(values) for name, values in seen.items()}


def plot(layers: Dict[str, LTQ], inputs: Optional[Dict[str, Tensor]], title: str, out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('matplotlib is not installed: pip install -e ".[plot]" (or pip install matplotlib)') from None
    cols = min(len(layers), 2)
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax, (name, q) in zip(axes.flat, layers.items()):
        with torch.no_grad():
            d = q.breakpoints()
            learned = q.thresholds()
            lo, hi = float(d[0]), float(d[-1])
            uniform = lo + (hi - lo) * (torch.arange(q.n_val) + 0.5) / q.n_val
            margin = 0.25 * (hi - lo)
            grid = torch.linspace(lo - margin, hi + margin, 801)
            levels = q.levels[q.codes(grid / q.scale1)] * q.scale2
        if inputs is not None:
            ax.hist(inputs[name].clamp(lo - margin, hi + margin).numpy(), bins=120, color="0.8",
                    label="inputs (scale1·x)")
        for i, t in enumerate(learned.tolist()):
            ax.axvline(t, color="tab:red", lw=1.4, label="learned thresholds" if i == 0 else None)
        for i, t in enumerate(uniform.tolist()):
            ax.axvline(t, color="tab:blue", lw=1.0, ls="--", label="uniform grid" if i == 0 else None)
        stairs = ax.twinx()
        stairs.plot(grid.numpy(), levels.numpy(), color="black", lw=1.2)
        stairs.set_ylabel("output (uniform levels)")
        ax.set_title(f"{name} ({q.n_bit}-bit)", fontsize=9)
        ax.set_xlabel("scale1 · x")
        ax.set_yticks([])
        ax.set_xlim(lo - margin, hi + margin)
    axes.flat[0].legend(loc="upper left", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_ranges({"--images": args.images})
    check_output_dir(str(Path(args.out).resolve().parent), "--out")
    model, tag, meta = load_checkpoint_model(args.checkpoint)
    model.eval()
    layers = pick_layers(model, args.layers)
    inputs = None
    if args.data is not None:
        dataset = D.image_folder(args.data, args.split, D.val_transform(*evaluation_sizes(meta)))
        loader = D.build_val_loader(dataset, 64, 0, 1, 0, False)
        inputs = collect_inputs(model, layers, loader, args.images)
    plot(layers, inputs, f"{tag}: learned LTQ thresholds vs the uniform grid ({Path(args.checkpoint).name})",
         args.out)
    print(f"wrote {args.out} ({', '.join(layers)})")
    return 0


if __name__ == "__main__":
    run_main(main)
