"""The report of ``scripts/compare_methods.py``: mean ± std per method and bits, Markdown, CSV, PNG."""

from __future__ import annotations

import csv
import functools
import io
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from n2uq.tables import METHOD_ROWS, load_paper_results  # noqa: E402

__all__ = ["RunResult", "Summary", "summarize", "write_report"]

#: Row order of the table, and the paper's name of each method (ResNet-18 rows of its table).
ORDER = ["n2uq", "n2uq-uniform-thresholds", "n2uq-maxabs-weights", "lsq", "pact", "dorefa", "full precision"]
PAPER_NAMES = {"n2uq": "N2UQ *", **METHOD_ROWS}
DISPLAY = {"n2uq": "N2UQ", "n2uq-uniform-thresholds": "N2UQ, uniform thresholds (ablation)",
           "n2uq-maxabs-weights": "N2UQ, max-abs weight scale (ablation)", "lsq": "LSQ", "pact": "PACT",
           "dorefa": "DoReFa-Net", "full precision": "full precision"}


@dataclass(frozen=True)
class RunResult:
    label: str  # a Quantizers tag, or "full precision"
    bits: Optional[int]  # None: full precision
    seed: int
    top1: float  # final epoch
    best_top1: float


@dataclass(frozen=True)
class Summary:
    label: str
    bits: Optional[int]
    mean: float
    std: float
    runs: int


def summarize(results: List[RunResult]) -> Dict[Tuple[str, Optional[int]], Summary]:
    groups: Dict[Tuple[str, Optional[int]], List[float]] = {}
    for r in results:
        groups.setdefault((r.label, r.bits), []).append(r.top1)
    return {key: Summary(key[0], key[1], statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for key, v in groups.items()}


@functools.cache
def _paper_resnet18() -> Dict[Tuple[str, int], float]:
    """The paper's ResNet-18 top-1 by (row name, bits), read once; the first row of a cell wins."""
    table: Dict[Tuple[str, int], float] = {}
    for r in load_paper_results():
        if r.network == "ResNet-18":
            table.setdefault((r.method, r.bits), r.top1)
    return table


def _paper(label: str, bits: int) -> Optional[float]:
    return _paper_resnet18().get((PAPER_NAMES.get(label), bits))


def _separations(summary: Dict[Tuple[str, Optional[int]], Summary]) -> List[str]:
    """For each bit width, N2UQ against every other method: is the gap larger than the seed spread
    (the two standard deviations added)?"""
    lines = []
    for (label, bits), s in sorted(summary.items(), key=lambda kv: (kv[0][1] or 99, ORDER.index(kv[0][0]))):
        base = summary.get(("n2uq", bits))
        if label == "n2uq" or bits is None or base is None or s.runs < 2 or base.runs < 2:
            continue
        gap, spread = base.mean - s.mean, base.std + s.std
        verdict = "larger than the seed spread" if abs(gap) > spread else "within the seed spread"
        lines.append(f"- W{bits}A{bits}: N2UQ − {DISPLAY[label]} = {gap:+.2f} points (spread {spread:.2f}): {verdict}")
    return lines


def render_markdown(summary: Dict[Tuple[str, Optional[int]], Summary], recipe: str) -> str:
    bits = sorted({b for (_, b) in summary if b is not None})
    head = "| method | " + " | ".join(f"W{b}A{b} here | W{b}A{b} paper (ImageNet)" for b in bits) + " |"
    lines = [f"Final-epoch validation top-1 (%), mean ± std over seeds (runs). Recipe: {recipe}.", "",
             head, "|" + "---|" * (1 + 2 * len(bits))]
    fp = [s for (label, b), s in summary.items() if b is None]
    for label in ORDER:
        if label == "full precision":
            continue
        cells = []
        for b in bits:
            s = summary.get((label, b))
            paper = _paper(label, b)
            cells.append(f"{s.mean:.2f} ± {s.std:.2f} ({s.runs})" if s else "—")
            cells.append(f"{paper:.1f}" if paper is not None else "—")
        if any(c != "—" for c in cells[::2]):
            lines.append(f"| {DISPLAY[label]} | " + " | ".join(cells) + " |")
    if fp:
        lines += ["", f"Full precision, same recipe: {fp[0].mean:.2f} ± {fp[0].std:.2f} ({fp[0].runs} runs)."]
    lines += ["", "The paper's column is ImageNet (ResNet-18, 128 epochs, KD from ResNet-101), for orientation only.",
              "", *(_separations(summary) or ["(separations need at least 2 seeds per cell)"])]
    return "\n".join(lines) + "\n"


def render_csv(results: List[RunResult]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "bits", "seed", "final_top1", "best_top1", "paper_imagenet_top1"])
    for r in sorted(results, key=lambda r: (ORDER.index(r.label), r.bits or 32, r.seed)):
        paper = _paper(r.label, r.bits) if r.bits else None
        writer.writerow([r.label, r.bits or "fp", r.seed, f"{r.top1:.2f}", f"{r.best_top1:.2f}",
                         "" if paper is None else paper])
    return buf.getvalue()


#: One marker per method, so points that overlap stay told apart.
MARKERS = {"n2uq": "o", "n2uq-uniform-thresholds": "s", "n2uq-maxabs-weights": "D", "lsq": "^", "pact": "v",
           "dorefa": "P"}


def point_positions(summary: Dict[Tuple[str, Optional[int]], Summary]) -> Dict[Tuple[str, int], float]:
    """x of each (method, bits) point: bit widths are categories at 0, 1, ...; the methods measured at a
    bit width are spread evenly over 0.7 of its slot, centred on its tick."""
    bits = sorted({b for (_, b) in summary if b is not None})
    positions = {}
    for slot, b in enumerate(bits):
        labels = [label for label in ORDER if (label, b) in summary]
        step = 0.7 / max(len(labels), 1)
        for j, label in enumerate(labels):
            positions[label, b] = slot + (j - (len(labels) - 1) / 2) * step
    return positions


def figure(summary: Dict[Tuple[str, Optional[int]], Summary]):
    """Top-1 per method at each bit width (unconnected points with ±std bars, a marker per method)
    and the full-precision line; bit widths are categories, each tick centred under its methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    positions = point_positions(summary)
    for label in ORDER[:-1]:
        points = sorted((b, s) for (name, b), s in summary.items() if name == label and b is not None)
        if points:
            ax.errorbar([positions[label, b] for b, _ in points], [s.mean for _, s in points],
                        yerr=[s.std for _, s in points], marker=MARKERS[label], capsize=3, linestyle="none",
                        markersize=6, label=DISPLAY[label])
    for (_, b), s in summary.items():
        if b is None:
            ax.axhline(s.mean, color="0.3", ls="--", lw=1, label=f"full precision ({s.mean:.1f})")
    bits = sorted({b for (_, b) in summary if b is not None})
    ax.set_xticks(range(len(bits)), [f"W{b}A{b}" for b in bits])
    ax.set_xlim(-0.5, len(bits) - 0.5)
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Same skeleton and recipe, only the quantizers differ")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(summary: Dict[Tuple[str, Optional[int]], Summary], path: Path) -> bool:
    """:func:`figure` saved as a PNG; False without matplotlib."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = figure(summary)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(results: List[RunResult], out: Path, recipe: str) -> List[Path]:
    summary = summarize(results)
    written = [out / "comparison.md", out / "comparison.csv"]
    written[0].write_text(render_markdown(summary, recipe), encoding="utf-8")
    written[1].write_text(render_csv(results), encoding="utf-8")
    if plot(summary, out / "comparison.png"):
        written.append(out / "comparison.png")
    else:
        print('comparison.png skipped: matplotlib is not installed (pip install -e ".[plot]")')
    return written
