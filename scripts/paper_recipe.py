"""The paper's recipe scaled to the demo data: does learning the thresholds help, and when?

    python scripts/paper_recipe.py --data data/fashion_mnist --out results/paper_recipe
    python scripts/compare_methods.py --recipe paper --data data/fashion_mnist --out results/paper_recipe
    python scripts/paper_recipe.py --report_only --out results/paper_recipe

Two stages per seed, paired by seed (docs/paper_recipe.md has the design and why):

1. a full-precision ResNet-18 (``resnet/train.py --full_precision``, the quick start's data
   flags, label-smoothed CE) in ``OUT/seed<k>/resnet18_fp/``. A finished one is reused; one that
   was trained with other flags is refused (never retrained or overwritten): another ``--out``, or
   remove that folder.
2. every quantized arm, initialised from that model (``--pretrained``) and distilled from it
   (``--teacher resnet18 --teacher_weights``: the paper's KD loss, no label term), with the paper's
   three parameter groups and linear schedule, in ``OUT/seed<k>/<run name>/``.

Stage-2 runs are trained ``--snapshot_every`` epochs per ``resnet/train.py`` call (each call
resumes the last); after each call the interval lengths ``a`` of every LTQ are appended to
``<run>/intervals.jsonl`` — how far the thresholds move, epoch by epoch. Every call's wall time
and load average go to ``OUT/wall_time.jsonl``. Interrupted, the same command continues where it
stopped. ``--until_epoch N`` stops every stage-2 run after its epoch N (a pilot, or a time window).
At the end it writes the report (:mod:`scripts.paper_recipe_report`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()


from n2uq.checkpoint import CheckpointError, extract_state_dict, read_checkpoint  # noqa: E402
from n2uq.cli import OneLineParser, UsageError, check_output_dir, run_main  # noqa: E402
from n2uq.methods import Quantizers  # noqa: E402
from n2uq.resume import RUN_CONTROL_FLAGS, recipe_differences  # noqa: E402
from n2uq.run_config import TrainConfig  # noqa: E402
from n2uq.train_state import run_name  # noqa: E402
from scripts.interrupt import run_child  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Stage-2 arms: the flags that differ from plain N2UQ. The first four answer the question.
ARMS: Dict[str, Dict[str, Any]] = {
    "n2uq": {},
    "n2uq-uniform-thresholds": {"uniform_thresholds": True},
    "n2uq-full-lr-thresholds": {"full_lr_thresholds": True},
    "lsq": {"method": "lsq"},
    "pact": {"method": "pact"},
    "dorefa": {"method": "dorefa"},
}
DEFAULT_ARMS = ("n2uq", "n2uq-uniform-thresholds", "n2uq-full-lr-thresholds", "lsq")
#: The quick start's data and optimiser flags, shared by both stages (docs/training.md, demo).
COMMON = {"student": "resnet18", "quantize_downsample": False, "batch_size": 128, "learning_rate": 2e-3,
          "image_size": 32, "val_resize": 32, "min_crop_scale": 1.0, "workers": 1}
#: Recorded flags that say where or how a call ran, not what was trained: not compared on reuse. A
#: resume may change them (n2uq.resume); this experiment also pins its data and init files.
RUN_ONLY = RUN_CONTROL_FLAGS - {"data", "pretrained"}
PATH_FLAGS = ("data", "pretrained", "teacher_weights")
FP_FOLDER = "resnet18_fp"
CHECKPOINT = "checkpoint.pth.tar"


@dataclass(frozen=True)
class Run:
    """One training run: ``arm`` (``None``: the stage-1 full-precision model), bits and seed."""

    arm: Optional[str]
    bits: int
    seed: int

    @property
    def label(self) -> str:
        return "full precision" if self.arm is None else f"{self.arm} W{self.bits}A{self.bits}"

    def folder(self, out: Path) -> Path:
        if self.arm is None:
            return out / f"seed{self.seed}" / FP_FOLDER
        return out / f"seed{self.seed}" / run_name("resnet18", self.bits, False, quantizers(self.arm, self.bits).tag)


def quantizers(arm: str, bits: int) -> Quantizers:
    flags = ARMS[arm]
    return Quantizers(bits, flags.get("method", "n2uq"), learned_thresholds=not flags.get("uniform_thresholds"),
                      full_lr_thresholds=bool(flags.get("full_lr_thresholds")))


def teacher_file(out: Path, seed: int) -> Path:
    """The stage-1 checkpoint of ``seed``: the initialisation and the teacher of its stage-2 runs."""
    return out / f"seed{seed}" / FP_FOLDER / CHECKPOINT


def train_flags(run: Run, args, out: Path) -> Dict[str, Any]:
    """The ``resnet/train.py`` flags of ``run`` as ``{flag name: value}`` (what its checkpoint records)."""
    flags: Dict[str, Any] = {"data": args.data, **COMMON, "seed": run.seed, "save": str(out / f"seed{run.seed}"),
                             "no_progress": True}
    if run.arm is None:
        return {**flags, "full_precision": True, "epochs": args.fp_epochs, "teacher": "none", "pretrained": "none"}
    fp = str(teacher_file(out, run.seed))
    return {**flags, "n_bit": run.bits, **ARMS[run.arm], "epochs": args.epochs, "pretrained": fp,
            "teacher": "resnet18", "teacher_weights": fp}


def to_argv(flags: Mapping[str, Any]) -> List[str]:
    argv: List[str] = []
    for name, value in flags.items():
        if name == "quantize_downsample":
            argv += [f"--{name}", "1" if value else "0"]
        elif isinstance(value, bool):
            argv += [f"--{name}"] if value else []
        else:
            argv += [f"--{name}", str(value)]
    return argv


def _same(name: str, saved: Any, wanted: Any) -> bool:
    if name in PATH_FLAGS and isinstance(saved, str) and isinstance(wanted, str):
        return os.path.realpath(saved) == os.path.realpath(wanted)
    return saved == wanted


def check_recorded(run_dir: Path, saved_args: Mapping[str, Any], flags: Mapping[str, Any]) -> None:
    """Refuse a run folder whose checkpoint was trained with other flags than ``flags`` ask for (a
    flag the checkpoint does not record, being older than the flag, counts as its default)."""
    diffs = recipe_differences({**TrainConfig().flags(), **saved_args}, TrainConfig.from_flags(flags).flags(),
                               run_control=RUN_ONLY, same=_same)
    if diffs:
        raise UsageError(f"{run_dir} was trained with other flags ({'; '.join(diffs[:4])}: recorded vs this recipe); "
                         f"pass another --out, or remove that folder to train it again")


def progress(run_dir: Path, flags: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The checkpoint of ``run_dir`` (checked against ``flags``), or ``None`` when there is none."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        raise UsageError(f"{path} cannot be read ({exc}); remove that run folder to train it again") from None
    check_recorded(run_dir, ckpt.get("args") or {}, flags)
    return ckpt


def is_finished(ckpt: Optional[Mapping[str, Any]], epochs: int) -> bool:
    return ckpt is not None and int(ckpt.get("next_epoch", 0)) >= epochs and not int(ckpt.get("step_in_epoch", 0))


def record_intervals(run_dir: Path, ckpt: Mapping[str, Any]) -> bool:
    """Append the LTQ interval lengths of a checkpoint written at an epoch end to ``intervals.jsonl``
    (once per epoch); ``False`` for a model without LTQ (the compared methods)."""
    state = extract_state_dict(ckpt, source=str(run_dir / CHECKPOINT))
    lengths = {key[:-2]: value.flatten().tolist() for key, value in state.items()
               if key.endswith(".a") and f"{key[:-2]}.start" in state}  # an LTQ's a, next to its start
    if not lengths or int(ckpt.get("step_in_epoch", 0)):
        return bool(lengths)
    path = run_dir / "intervals.jsonl"
    epoch = int(ckpt["next_epoch"])
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    seen = {json.loads(line)["epoch"] for line in lines}
    if epoch not in seen:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"epoch": epoch, "val_top1": float(ckpt.get("val_top1", 0.0)), "a": lengths}) + "\n")
    return True


def call_train(run: Run, argv: List[str], out: Path) -> None:
    """One ``resnet/train.py`` call; its wall time and the load average go to ``OUT/wall_time.jsonl``.
    A failure stops with its log's path."""
    log = out / "logs" / f"seed{run.seed}_{'fp' if run.arm is None else f'{run.arm}_w{run.bits}'}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "resnet" / "train.py"), *argv]
    load_before, start = os.getloadavg()[0], time.time()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        code = run_child(cmd, f"the training run (log {log})", stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"})
    seconds = time.time() - start
    with open(out / "wall_time.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"run": run.label, "seed": run.seed, "seconds": round(seconds, 1),
                            "load_before": load_before, "load_after": os.getloadavg()[0], "code": code}) + "\n")
    if code != 0:
        last = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()][-1:]
        raise RuntimeError(f"{run.label} seed {run.seed} failed ({last[0] if last else 'no output'}); full log: {log}")


def stage_one(run: Run, args, out: Path) -> str:
    """Train (or reuse) the full-precision model of ``run.seed``; returns what was done."""
    flags = train_flags(run, args, out)
    ckpt = progress(run.folder(out), flags)
    if is_finished(ckpt, args.fp_epochs):
        return f"reused (top-1 {float(ckpt['val_top1']):.2f}%)"
    call_train(run, to_argv(flags), out)
    ckpt = progress(run.folder(out), flags)
    if not is_finished(ckpt, args.fp_epochs):
        raise RuntimeError(f"{run.folder(out)} did not finish {args.fp_epochs} epochs; see {out / 'logs'}")
    return f"trained (top-1 {float(ckpt['val_top1']):.2f}%)"


def stage_two(run: Run, args, out: Path) -> str:
    """Train ``run`` up to ``--until_epoch`` (default: all epochs), ``--snapshot_every`` epochs per call."""
    flags = train_flags(run, args, out)
    target = min(args.until_epoch or args.epochs, args.epochs)
    ckpt = progress(run.folder(out), flags)
    if ckpt is not None:
        record_intervals(run.folder(out), ckpt)
    calls = 0
    while ckpt is None or int(ckpt["next_epoch"]) < target or int(ckpt.get("step_in_epoch", 0)):
        done = 0 if ckpt is None else int(ckpt["next_epoch"])
        call_train(run, to_argv({**flags, "epochs_per_run": min(args.snapshot_every, max(1, target - done))}), out)
        ckpt = progress(run.folder(out), flags)
        if ckpt is None or int(ckpt["next_epoch"]) <= done:
            raise RuntimeError(f"{run.folder(out)} made no progress; see {out / 'logs'}")
        record_intervals(run.folder(out), ckpt)
        calls += 1
    did = "trained" if calls else "reused"
    return f"{did} to epoch {int(ckpt['next_epoch'])} (top-1 {float(ckpt['val_top1']):.2f}%)"


def grid(args) -> List[Run]:
    """Stage 1 of every seed first, then the arms seed by seed (a stopped grid holds whole pairs)."""
    runs = [Run(None, 32, s) for s in args.seeds]
    runs += [Run(arm, b, s) for s in args.seeds for b in args.bits for arm in args.arms]
    return runs


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="paper_recipe.py", description="The paper's recipe scaled to the demo data: a full-"
                      "precision init and teacher per seed, then every quantized arm from it (docs/paper_recipe.md).")
    p.add_argument("--data", default="data/fashion_mnist", help="ImageFolder root (default: the demo data)")
    p.add_argument("--out", default="results/paper_recipe", help="folder for runs, logs and the report")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(DEFAULT_ARMS), help="stage-2 arms")
    p.add_argument("--bits", nargs="+", type=int, default=[2], help="weight/activation bit widths (e.g. 2 3)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fp_epochs", type=int, default=6, help="stage 1: full-precision epochs")
    p.add_argument("--epochs", type=int, default=10, help="stage 2: epochs of every quantized arm")
    p.add_argument("--snapshot_every", type=int, default=1, help="stage 2: epochs per train.py call (snapshots)")
    p.add_argument("--until_epoch", type=int, default=0, help="stop stage 2 after this epoch (0: --epochs)")
    p.add_argument("--report_only", action="store_true", help="train nothing; report the runs found in --out")
    p.add_argument("--no_pictures", action="store_true", help="report without show_thresholds.py pictures")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def validate(args) -> None:
    for name in ("fp_epochs", "epochs"):
        if getattr(args, name) < 2:
            raise UsageError(f"--{name} must be at least 2: the paper's schedule trains its last epoch at lr 0")
    if args.snapshot_every < 1 or args.until_epoch < 0:
        raise UsageError("--snapshot_every must be >= 1 and --until_epoch >= 0")
    for bits in args.bits:
        if not 2 <= bits <= 8:
            raise UsageError(f"bit widths must be in 2..8 (LSQ has no 1-bit signed grid), got {bits}")
    if len(set(args.seeds)) < len(args.seeds):
        raise UsageError("--seeds repeats a seed; the arms are paired by seed")
    check_output_dir(args.out, "--out")
    if not args.report_only and not (Path(args.data) / "train").is_dir():
        raise UsageError(f"no train/ folder in {args.data}; build the demo data with "
                         f"python3 scripts/prepare_demo_data.py --out {args.data}")


def delegated_argv(argv: List[str]) -> Optional[List[str]]:
    """``argv`` without ``--recipe paper`` when ``compare_methods.py`` was asked for this recipe, else ``None``."""
    for i, token in enumerate(argv):
        if token == "--recipe=paper":
            return argv[:i] + argv[i + 1:]
        if token == "--recipe" and argv[i + 1:i + 2] == ["paper"]:
            return argv[:i] + argv[i + 2:]
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [] if args.report_only else grid(args)
    for i, run in enumerate(runs, 1):
        where = f"[{i}/{len(runs)}] {run.label:<38} seed {run.seed}"
        print(f"{where}: ...", flush=True)
        did = stage_one(run, args, out) if run.arm is None else stage_two(run, args, out)
        print(f"{where}: {did}", flush=True)
    from scripts.paper_recipe_report import write_report

    for path in write_report(out, args.data, pictures=not args.no_pictures):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
