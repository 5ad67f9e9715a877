"""Train N2UQ and the compared methods under one recipe, then tabulate and plot top-1.

    python scripts/compare_methods.py --data data/fashion_mnist --out results/comparison
    python scripts/compare_methods.py --methods n2uq lsq --bits 2 --seeds 0 1 --epochs 4
    python scripts/compare_methods.py --report_only --out results/comparison

Every run is ``resnet/train.py`` (the one training engine) with ``--method`` and the flags of the
recipe below; only the quantizers differ between methods. Runs go to ``OUT/seed<k>/<run name>/``
and their logs to ``OUT/logs/``; a finished run is skipped when the command is repeated (an
interrupted one resumes), so the comparison can be stopped and continued. At the end it writes
``OUT/comparison.md``, ``OUT/comparison.csv`` and ``OUT/comparison.png`` (matplotlib:
``pip install -e ".[plot]"``): final-epoch validation top-1, mean ± std over seeds, per method and
bit width, beside the full-precision model trained the same way and the paper's ImageNet numbers.

The default recipe is the quick start's (Fashion-MNIST demo data: ResNet-18, 32×32 images, no
teacher, no pretrained weights, batch 128, lr 2e-3), with ``--epochs`` (default 4) chosen so that
the default grid — 4 methods × W2A2/W4A4 × 3 seeds, N2UQ's two ablations at W2A2 × 3 seeds and the
full-precision reference × 3 seeds, 33 runs — takes about 90–100 minutes on 2 CPU cores
(102 measured, docs/comparison.md).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()


from n2uq.checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from n2uq.cli import OneLineParser, UsageError, check_output_dir, run_main  # noqa: E402
from n2uq.methods import METHODS, Quantizers  # noqa: E402
from n2uq.train_state import run_name  # noqa: E402
from scripts.comparison_report import RunResult, write_report  # noqa: E402
from scripts.interrupt import run_child  # noqa: E402
from scripts.run_flags import differences, recorded_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ("--teacher none --pretrained none --batch_size 128 --learning_rate 2e-3 --image_size 32 "
               "--val_resize 32 --min_crop_scale 1.0 -j 1")
ABLATIONS = {"uniform_thresholds": "--uniform_thresholds", "maxabs_weights": "--maxabs_weights"}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid: ``quantizers`` (``None``: the full-precision reference) and a seed."""

    quantizers: Optional[Quantizers]
    seed: int

    @property
    def label(self) -> str:
        return "full precision" if self.quantizers is None else self.quantizers.tag

    @property
    def folder(self) -> str:
        if self.quantizers is None:
            return "resnet18_fp"
        return run_name("resnet18", self.quantizers.n_bit, False, self.quantizers.tag)

    def flags(self) -> List[str]:
        if self.quantizers is None:
            return ["--full_precision"]
        q = self.quantizers
        flags = ["--n_bit", str(q.n_bit), "--method", q.method]
        flags += [] if q.learned_thresholds else [ABLATIONS["uniform_thresholds"]]
        flags += [] if q.entropy_preserving else [ABLATIONS["maxabs_weights"]]
        return flags


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="compare_methods.py", description="N2UQ vs LSQ, PACT and DoReFa-Net under one recipe.")
    p.add_argument("--data", default="data/fashion_mnist", help="ImageFolder root (default: the demo data)")
    p.add_argument("--out", default="results/comparison", help="folder for runs, logs and the report")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--bits", nargs="+", type=int, default=[2, 4], help="weight/activation bit widths")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--ablations", nargs="*", choices=sorted(ABLATIONS), default=sorted(ABLATIONS),
                   help="N2UQ ablations to add (each at --ablation_bits); none: --ablations with no value")
    p.add_argument("--ablation_bits", nargs="+", type=int, default=[2])
    p.add_argument("--no_full_precision", action="store_true", help="skip the full-precision reference runs")
    p.add_argument("--epochs", type=int, default=4, help="per run; the last one trains at lr 0 (the schedule)")
    p.add_argument("--recipe", default=DEMO_RECIPE, help="the resnet/train.py flags every run shares; or paper: "
                   "scripts/paper_recipe.py with the other options (docs/paper_recipe.md)")
    p.add_argument("--report_only", action="store_true", help="train nothing; report the runs found in --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def grid(args) -> List[RunSpec]:
    specs = [RunSpec(Quantizers(b, m), s) for m in args.methods for b in args.bits for s in args.seeds]
    for name in args.ablations:
        for b in args.ablation_bits:
            q = Quantizers(b, learned_thresholds=name != "uniform_thresholds",
                           entropy_preserving=name != "maxabs_weights")
            specs += [RunSpec(q, s) for s in args.seeds]
    if not args.no_full_precision:
        specs += [RunSpec(None, s) for s in args.seeds]
    return specs


def finished(run_dir: Path, epochs: int) -> Optional[Tuple[float, float]]:
    """``(final-epoch top-1, best top-1)`` of a run that trained all ``epochs``, else ``None``."""
    path = run_dir / "checkpoint.pth.tar"
    if not path.is_file():
        return None
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError:
        return None
    if int(ckpt.get("next_epoch", 0)) < epochs or int(ckpt.get("step_in_epoch", 0)):
        return None
    return float(ckpt["val_top1"]), float(ckpt["best_top1_acc"])


def grid_flags(spec: RunSpec, args, out: Path) -> List[str]:
    """The flags of one run that the grid sets (its data, cell, seed, epochs and folder)."""
    return ["--data", args.data, "--student", "resnet18", "--quantize_downsample", "0", "--epochs", str(args.epochs),
            "--seed", str(spec.seed), "--save", str(out / f"seed{spec.seed}"), "--no_progress", *spec.flags()]


#: Flags the grid sets for every run (or for some of its cells): ``--recipe`` may not set them.
GRID_FLAGS = ("--data", "--student", "--quantize_downsample", "--epochs", "--seed", "--save", "--n_bit", "--method",
              "--full_precision", *ABLATIONS.values(), "--full_lr_thresholds", "--resume")


def check_recipe(recipe: str) -> List[str]:
    """The ``--recipe`` flags as a list; :class:`UsageError` naming a flag the grid sets itself (the
    recipe would override it: every seed the same run, or a cell that is not what it is reported as)."""
    try:
        tokens = shlex.split(recipe)
    except ValueError as exc:
        raise UsageError(f"--recipe cannot be split into flags ({exc})") from None
    for token in tokens:
        flag = token.split("=", 1)[0]
        # argparse also takes an unambiguous prefix of a flag (--seed for --seed, --epo for --epochs)
        if flag.startswith("--") and len(flag) > 2 and any(grid_flag.startswith(flag) for grid_flag in GRID_FLAGS):
            raise UsageError(f"--recipe sets {flag}, which the grid sets for each run; use the grid's own option "
                             f"(--data, --methods, --bits, --seeds, --epochs, --ablations, --out) instead")
    return tokens


def train_flags(spec: RunSpec, args, out: Path) -> List[str]:
    """The ``resnet/train.py`` flags of one run of the grid: the recipe, then the grid's own flags."""
    return [*check_recipe(args.recipe), *grid_flags(spec, args, out)]


def check_existing_runs(specs: List[RunSpec], args, out: Path) -> None:
    """Every run already in ``out`` (finished or interrupted) must have been trained with this grid's
    flags: it is reused or resumed, and reported under this recipe. Raises :class:`UsageError` naming
    the first one that differs, before anything is trained."""
    for spec in specs:
        path = out / f"seed{spec.seed}" / spec.folder / "checkpoint.pth.tar"
        if not path.is_file():
            continue
        try:
            diffs = differences(train_flags(spec, args, out), recorded_args(str(path)))
        except CheckpointError:
            continue  # unreadable: train.py's resume says what to do with it
        if diffs:
            raise UsageError(f"{path.parent} was trained with other settings ({'; '.join(diffs)}); pass the "
                             f"--data/--epochs/--recipe it was trained with, or another --out")


def train(spec: RunSpec, args, out: Path) -> float:
    """Run (or resume) one training; returns its wall time. A failure stops with its log's path."""
    log = out / "logs" / f"seed{spec.seed}_{spec.folder}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "resnet" / "train.py"), *train_flags(spec, args, out)]
    start = time.time()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        code = run_child(cmd, f"the training run (log {log})", stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if code != 0:
        last = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()][-1:]
        raise RuntimeError(f"{spec.label} seed {spec.seed} failed ({last[0] if last else 'no output'}); "
                           f"full log: {log}")
    return time.time() - start


def main(argv: Optional[List[str]] = None) -> int:
    from scripts.paper_recipe import build_parser as paper_recipe_parser
    from scripts.paper_recipe import delegated_argv
    from scripts.paper_recipe import main as paper_recipe_main

    paper_argv = delegated_argv(list(sys.argv[1:] if argv is None else argv))
    if paper_argv is not None:  # --recipe paper: the paper's recipe scaled down (docs/paper_recipe.md)
        unknown = [t for t in paper_recipe_parser().parse_known_args(paper_argv)[1] if t.startswith("-")]
        if unknown:
            raise UsageError(f"{unknown[0].split('=', 1)[0]} is not an option of --recipe paper "
                             f"(scripts/paper_recipe.py): it trains the arms given by --arms, e.g. --arms n2uq lsq")
        return paper_recipe_main(paper_argv)
    args = build_parser().parse_args(argv)
    check_recipe(args.recipe)
    if len(set(args.seeds)) < len(args.seeds):
        raise UsageError("--seeds repeats a seed; each seed is one run, counted once in the mean ± std")
    if args.epochs < 2:
        raise UsageError("--epochs must be at least 2: the paper's schedule trains its last epoch at lr 0")
    for bits in (*args.bits, *args.ablation_bits):
        if not 2 <= bits <= 8:
            raise UsageError(f"bit widths must be in 2..8 (LSQ has no 1-bit signed grid), got {bits}")
    check_output_dir(args.out, "--out")
    out = Path(args.out).resolve()  # the runs are started in the repository root
    if not args.report_only and not (Path(args.data) / "train").is_dir():
        raise UsageError(f"no train/ folder in {args.data}; build the demo data with "
                         f"python3 scripts/prepare_demo_data.py --out {args.data}")
    args.data = str(Path(args.data).resolve())
    specs = grid(args)
    check_existing_runs(specs, args, out)
    results: List[RunResult] = []
    for i, spec in enumerate(specs, 1):
        run_dir = out / f"seed{spec.seed}" / spec.folder
        done = finished(run_dir, args.epochs)
        bits = f"W{spec.quantizers.n_bit}A{spec.quantizers.n_bit}" if spec.quantizers else "FP"
        where = f"[{i}/{len(specs)}] {spec.label:<38} {bits:<5} seed {spec.seed}"
        if done is None and not args.report_only:
            print(f"{where}: training ...", flush=True)
            seconds = train(spec, args, out)
            done = finished(run_dir, args.epochs)
            if done is None:
                raise RuntimeError(f"{run_dir} did not finish {args.epochs} epochs; see {out / 'logs'}")
            print(f"{where}: top-1 {done[0]:.2f}% ({seconds / 60:.1f} min)", flush=True)
        elif done is not None:
            print(f"{where}: done earlier, top-1 {done[0]:.2f}% (skipped)", flush=True)
        if done is not None:
            results.append(RunResult(spec.label, spec.quantizers.n_bit if spec.quantizers else None, spec.seed,
                                     done[0], done[1]))
    if not results:
        raise UsageError(f"no finished run of {args.epochs} epochs in {out}; run without --report_only first")
    for path in write_report(results, out, f"data {args.data}; {args.epochs} epochs, {args.recipe}"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
