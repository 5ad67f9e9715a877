"""The report of ``scripts/paper_recipe.py``, from its run folders only.

    python scripts/paper_recipe_report.py --out results/paper_recipe [--data data/fashion_mnist]
    python scripts/paper_recipe_report.py --out results/paper_recipe --movement   # print, write nothing

Reads ``OUT/seed<k>/<run>/metrics.jsonl`` (the engine's per-epoch log: flags, lr, loss, top-1,
seconds), ``<run>/intervals.jsonl`` (the LTQ interval lengths after each epoch) and
``OUT/wall_time.jsonl``, and writes ``OUT/paper_recipe.md`` (the table of final-epoch top-1, mean ±
std; every pair of arms as paired per-seed differences with a 95 % t-interval; threshold movement
per layer and per epoch; wall time), ``OUT/paper_recipe.csv`` (every run), ``OUT/curves.png``,
``OUT/movement.png`` and, with ``--data``, ``scripts/show_thresholds.py`` pictures of each N2UQ arm.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()


from n2uq.cli import OneLineParser, UsageError, run_main  # noqa: E402
from n2uq.methods import method_tag  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["full precision", "n2uq", "n2uq-uniform-thresholds", "n2uq-full-lr-thresholds", "lsq", "pact", "dorefa"]


@dataclass
class RunLog:
    """One run's flags and epochs as its ``metrics.jsonl`` and ``intervals.jsonl`` tell them."""

    arm: str
    bits: Optional[int]  # None: full precision
    seed: int
    epochs: int  # planned
    folder: Path
    curve: Dict[int, dict] = field(default_factory=dict)  # epoch index -> the engine's epoch event
    intervals: Dict[int, Dict[str, List[float]]] = field(default_factory=dict)  # finished epochs -> layer -> a

    @property
    def finished(self) -> bool:
        return len(self.curve) >= self.epochs

    @property
    def top1(self) -> float:
        return float(self.curve[max(self.curve)]["val"]["top1"])


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom: the ``t`` where
    ``P(|T| <= t) = 0.95``, with the finite series of P(|T| <= t) for integer ``df``
    (Abramowitz & Stegun 26.7.3/26.7.4), solved by bisection."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")

    def central(t: float) -> float:
        theta = math.atan(t / math.sqrt(df))
        c2 = math.cos(theta) ** 2
        if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
            term, total = 1.0, 1.0 if df > 1 else 0.0
            for k in range(1, (df - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
        term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total

    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central(mid) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def paired_interval(diffs: Sequence[float]) -> Tuple[float, float, float]:
    """``(mean, low, high)``: the mean of per-seed differences and its 95 % t-interval."""
    if len(diffs) < 2:
        raise ValueError("a paired interval needs at least 2 seeds")
    mean = statistics.fmean(diffs)
    half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def verdict(low: float, high: float, first: str, second: str) -> str:
    if low <= 0.0 <= high:
        return "inside the noise (the interval covers 0)"
    return f"{first} {'higher' if low > 0 else 'lower'} than {second}"


def movement(lengths: Sequence[float]) -> Tuple[float, float]:
    """``(max, mean)`` of ``|a_i - 2/n|`` over one LTQ's ``n`` interval lengths (2/n: the uniform grid)."""
    uniform = 2.0 / len(lengths)
    gaps = [abs(a - uniform) for a in lengths]
    return max(gaps), statistics.fmean(gaps)


def _events(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_runs(out: Path) -> List[RunLog]:
    runs = []
    for metrics in sorted(out.glob("seed*/*/metrics.jsonl")):
        events = _events(metrics)
        starts = [e for e in events if e.get("event") == "start"]
        if not starts:
            continue
        args = starts[-1]["args"]
        fp = bool(args.get("full_precision"))
        arm = "full precision" if fp else method_tag(
            args["method"], not args.get("uniform_thresholds"), not args.get("maxabs_weights"),
            bool(args.get("full_lr_thresholds")))
        run = RunLog(arm, None if fp else int(args["n_bit"]), int(args["seed"]), int(args["epochs"]), metrics.parent)
        run.curve = {int(e["epoch"]): e for e in events if e.get("event") == "epoch" and "val" in e}
        if (metrics.parent / "intervals.jsonl").exists():
            run.intervals = {int(e["epoch"]): e["a"] for e in _events(metrics.parent / "intervals.jsonl")}
        runs.append(run)
    return runs


def _key(run: RunLog) -> Tuple[int, int]:
    return (run.bits or 0, ORDER.index(run.arm) if run.arm in ORDER else len(ORDER))


def results_table(runs: List[RunLog]) -> List[str]:
    cells: Dict[Tuple[str, Optional[int]], List[RunLog]] = {}
    for run in sorted(runs, key=_key):
        if run.finished:
            cells.setdefault((run.arm, run.bits), []).append(run)
    lines = ["| arm | bits | final-epoch val top-1 (%) | per seed | runs |", "|---|---|---|---|---|"]
    for (arm, bits), group in cells.items():
        values = [r.top1 for r in group]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        seeds = ", ".join(f"{r.seed}: {r.top1:.2f}" for r in sorted(group, key=lambda r: r.seed))
        lines.append(f"| {arm} | {'FP' if bits is None else f'W{bits}A{bits}'} | {statistics.fmean(values):.2f} ± "
                     f"{spread:.2f} | {seeds} | {len(values)} |")
    return lines


def paired_table(runs: List[RunLog]) -> List[str]:
    """Every pair of quantized arms at one bit width, over the seeds both finished."""
    done = {(r.arm, r.bits, r.seed): r.top1 for r in runs if r.finished and r.bits is not None}
    arms = sorted({(r.arm, r.bits) for r in runs if r.bits is not None}, key=lambda ab: (ab[1], ORDER.index(ab[0])))
    lines = ["| A − B | bits | per-seed differences | mean | 95 % t-interval | verdict |", "|---|---|---|---|---|---|"]
    for i, (a, bits) in enumerate(arms):
        for b, bits_b in arms[i + 1:]:
            if bits_b != bits:
                continue
            seeds = sorted(s for (arm, bb, s) in done if arm == a and bb == bits and (b, bits, s) in done)
            if len(seeds) < 2:
                continue
            diffs = [done[(a, bits, s)] - done[(b, bits, s)] for s in seeds]
            mean, low, high = paired_interval(diffs)
            lines.append(f"| {a} − {b} | W{bits}A{bits} | {', '.join(f'{d:+.2f}' for d in diffs)} | {mean:+.2f} | "
                         f"[{low:+.2f}, {high:+.2f}] | {verdict(low, high, a, b)} |")
    return lines if len(lines) > 2 else ["(paired differences need at least 2 seeds finished by both arms)"]


def movement_by_epoch(runs: List[RunLog]) -> Dict[Tuple[str, int], Dict[int, Dict[str, Tuple[float, float]]]]:
    """``(arm, bits) -> epoch -> layer -> (max, mean) |a − 2/n|``, averaged over the seeds."""
    table: Dict[Tuple[str, int], Dict[int, Dict[str, List[Tuple[float, float]]]]] = {}
    for run in runs:
        for epoch, layers in run.intervals.items():
            for layer, lengths in layers.items():
                per = table.setdefault((run.arm, run.bits or 0), {}).setdefault(epoch, {})
                per.setdefault(layer, []).append(movement(lengths))
    return {key: {e: {layer: (statistics.fmean(m for m, _ in v), statistics.fmean(x for _, x in v))
                      for layer, v in layers.items()} for e, layers in sorted(epochs.items())}
            for key, epochs in table.items()}


def movement_lines(runs: List[RunLog]) -> List[str]:
    lines: List[str] = []
    for (arm, bits), epochs in movement_by_epoch(runs).items():
        last = max(epochs)
        lines += ["", f"{arm} W{bits}A{bits}: |a − 2/n| per epoch (max / mean over the layers' intervals, "
                      f"averaged over seeds)", "", "| epoch | max over layers | mean over layers |", "|---|---|---|"]
        for e, layers in epochs.items():
            lines.append(f"| {e} | {max(m for m, _ in layers.values()):.4f} | "
                         f"{statistics.fmean(x for _, x in layers.values()):.4f} |")
        lines += ["", f"per layer after epoch {last}:", "", "| layer | max | mean |", "|---|---|---|"]
        lines += [f"| {layer} | {m:.4f} | {x:.4f} |" for layer, (m, x) in epochs[last].items()]
    return lines or ["(no LTQ interval snapshots found)"]


def wall_lines(out: Path, runs: List[RunLog]) -> List[str]:
    path = out / "wall_time.jsonl"
    calls = _events(path) if path.exists() else []
    if not calls:
        return ["(no wall_time.jsonl)"]
    by_run: Dict[str, float] = {}
    for c in calls:
        by_run[c["run"]] = by_run.get(c["run"], 0.0) + c["seconds"]
    loads = [c[k] for c in calls for k in ("load_before", "load_after")]
    lines = [f"{len(calls)} train.py calls, {sum(by_run.values()) / 60:.1f} min in all (load average "
             f"{min(loads):.1f}–{max(loads):.1f} at the calls' start and end).", "",
             "| run (all seeds) | minutes | training s/epoch (median) |", "|---|---|---|"]
    for label, seconds in sorted(by_run.items()):
        times = [e["train"]["time_s"] for r in runs if (r.arm if r.bits is None else f"{r.arm} W{r.bits}A{r.bits}")
                 == label for e in r.curve.values()]
        lines.append(f"| {label} | {seconds / 60:.1f} | {statistics.median(times) if times else float('nan'):.1f} |")
    return lines


def _plots(runs: List[RunLog], out: Path) -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('curves.png and movement.png skipped: matplotlib is not installed (pip install -e ".[plot]")')
        return []
    fig, (ax_val, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    colours: Dict[str, str] = {}
    for run in sorted(runs, key=_key):
        label = run.arm if run.bits is None else f"{run.arm} W{run.bits}A{run.bits}"
        colour = colours.setdefault(label, f"C{len(colours)}")
        epochs = sorted(run.curve)
        first = label not in [t.get_label() for t in ax_val.lines]
        ax_val.plot([e + 1 for e in epochs], [run.curve[e]["val"]["top1"] for e in epochs], color=colour, lw=1,
                    label=label if first else None)
        ax_loss.plot([e + 1 for e in epochs], [run.curve[e]["train"]["loss"] for e in epochs], color=colour, lw=1)
    ax_val.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation top-1 (one line per seed)")
    ax_loss.set(xlabel="epoch", ylabel="train loss (KD for the quantized arms)", title="training loss")
    ax_val.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    written = [out / "curves.png"]
    table = movement_by_epoch(runs)
    if table:
        fig, (ax_e, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
        for (arm, bits), epochs in table.items():
            xs = sorted(epochs)
            ax_e.plot(xs, [max(m for m, _ in epochs[e].values()) for e in xs], marker="o",
                      label=f"{arm} W{bits}A{bits}")
            last = epochs[max(xs)]
            ax_l.plot(range(len(last)), [m for m, _ in last.values()], marker=".", label=f"{arm} W{bits}A{bits}")
            ax_l.set_xticks(range(len(last)), [n.replace("layer", "L").replace(".quan", "q") for n in last],
                            rotation=90, fontsize=6)
        ax_e.set(xlabel="epochs trained", ylabel="max |a − 2/n| over layers", title="threshold movement per epoch")
        ax_l.set(ylabel="max |a − 2/n| (final epoch)", title="threshold movement per layer")
        ax_e.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "movement.png", dpi=110)
        written.append(out / "movement.png")
    return written


def threshold_pictures(runs: List[RunLog], out: Path, data: str) -> List[Path]:
    """``scripts/show_thresholds.py`` on the final checkpoint of the lowest seed of each learned-threshold arm."""
    written = []
    for run in sorted(runs, key=lambda r: (_key(r), r.seed)):
        target = out / f"thresholds_{run.arm}_w{run.bits}.png"
        if not run.intervals or run.arm == "n2uq-uniform-thresholds" or not run.finished or target in written:
            continue
        cmd = [sys.executable, str(ROOT / "scripts" / "show_thresholds.py"), "--checkpoint",
               str(run.folder / "checkpoint.pth.tar"), "--data", data, "--out", str(target)]
        if subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).returncode == 0:
            written.append(target)
        else:
            print(f"{target.name} skipped: show_thresholds.py failed on {run.folder}")
    return written


def write_report(out: Path, data: Optional[str], pictures: bool = True) -> List[Path]:
    runs = read_runs(out)
    if not runs:
        raise UsageError(f"no run with a metrics.jsonl under {out}/seed*/; train first (scripts/paper_recipe.py)")
    unfinished = [f"{r.folder.parent.name}/{r.folder.name} ({len(r.curve)}/{r.epochs} epochs)"
                  for r in runs if not r.finished]
    text = ["# The paper's recipe, scaled down: results", "",
            "Generated by `scripts/paper_recipe_report.py` from the run folders; the design is in "
            "docs/paper_recipe.md.", "", "## Final-epoch validation top-1", "", *results_table(runs),
            *(["", f"Not finished (left out of the tables): {', '.join(unfinished)}"] if unfinished else []),
            "", "## Paired differences (same seed: same full-precision init and teacher)", "", *paired_table(runs),
            "", "## Threshold movement: |a − 2/n| of the LTQ interval lengths", *movement_lines(runs),
            "", "## Wall time", "", *wall_lines(out, runs)]
    (out / "paper_recipe.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    rows = ["arm,bits,seed,epochs_done,epochs,final_top1"] + [
        f"{r.arm},{r.bits or 'fp'},{r.seed},{len(r.curve)},{r.epochs},{r.top1 if r.curve else ''}"
        for r in sorted(runs, key=lambda r: (_key(r), r.seed))]
    (out / "paper_recipe.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    written = [out / "paper_recipe.md", out / "paper_recipe.csv", *_plots(runs, out)]
    if pictures and data:
        written += threshold_pictures(runs, out, data)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    p = OneLineParser(prog="paper_recipe_report.py", description="Report the runs of scripts/paper_recipe.py.")
    p.add_argument("--out", required=True, help="the --out folder of scripts/paper_recipe.py")
    p.add_argument("--data", default=None, help="the demo data: also draw show_thresholds.py pictures")
    p.add_argument("--movement", action="store_true", help="print the threshold movement per epoch and layer only")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = p.parse_args(argv)
    if not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is not a folder; pass the --out of scripts/paper_recipe.py")
    if args.movement:
        print("\n".join(movement_lines(read_runs(Path(args.out)))))
        return 0
    for path in write_report(Path(args.out), args.data, pictures=args.data is not None):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
