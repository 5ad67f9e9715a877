"""Reading a checkpoint back to resume a run: which file, whether it fits this run, and restoring it.

``--resume auto`` takes the run folder's ``checkpoint.pth.tar`` when there is one (else the one in
the folder where the reference's script writes this model, when that differs), ``none`` starts
over, any other value is a file. The file must hold the model this run trains (architecture, bits,
downsample kind, classes), have been trained with this run's recipe (every recorded flag but the
run-control ones of :data:`RUN_CONTROL_FLAGS`: a resumed run never changes its schedule, loss or
data mid-way) and, when it stopped inside an epoch, the data layout of this run (batch size, seed,
process count, number of training images), or the run stops with one line saying so. Files of the
reference's format (no recorded flags) are resumed too (:mod:`n2uq.reference_format`).
"""

from __future__ import annotations

import os
import shutil
from typing import AbstractSet, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from n2uq.atomic_io import atomic_path
from n2uq.checkpoint import CheckpointError, infer_config, load_state_dict_strict, read_checkpoint
from n2uq.cli import UsageError
from n2uq.reference_format import is_reference_checkpoint, map_reference_adam_state, replay_schedule
from n2uq.run_config import TrainConfig, class_difference
from n2uq.train_state import (
    BEST_NAME,
    CHECKPOINT_NAME,
    SKIP_COUNTERS,
    TRAIN_SUMS,
    TrainingParts,
    TrainProgress,
    restore_rng,
)

__all__ = ["RUN_CONTROL_FLAGS", "resolve_resume", "read_training_checkpoint", "read_resume", "check_resume",
           "recipe_differences", "restore_training", "resumed_flags", "carry_best"]

_CONFIG_KEYS = ("arch", "n_bit", "quantize_downsample", "num_classes", "full_precision", "method")

#: The flags (:meth:`n2uq.run_config.TrainConfig.flags`) a resumed run may change: where the run
#: reads and writes (``data``, ``save``, ``models_dir``: folders may move), how and how fast it runs
#: (device, threads, workers, memory format, compile), how long this invocation runs and how often it
#: saves, what it prints, how it handles faults (``skip_*``), and ``pretrained``, read only when a run
#: starts (a resume takes every weight from the checkpoint). Every other recorded flag is the recipe
#: (the model, the images and their transforms, the loss, Adam and its groups, the schedule's length,
#: the seed, the numerics of ``amp``) and must be the checkpoint's: a flag added later is compared
#: unless it is named here (docs/reliability.md).
RUN_CONTROL_FLAGS = frozenset({
    "data", "save", "models_dir", "pretrained", "resume", "device", "threads", "workers", "channels_last",
    "compile", "epochs_per_run", "steps_per_run", "save_every_steps", "log_every", "no_progress", "check_only",
    "debug", "skip_nonfinite", "skip_bad_images"})


def resolve_resume(resume: str, run_dir: str, other_dirs: Sequence[str] = ()) -> Optional[str]:
    """The file ``--resume`` names: ``None`` for ``none`` or for ``auto`` without a checkpoint.

    ``auto`` looks in ``run_dir``, then in ``other_dirs`` (in order).
    """
    if resume == "none":
        return None
    if resume == "auto":
        for folder in (run_dir, *other_dirs):
            path = os.path.join(folder, CHECKPOINT_NAME)
            if os.path.isfile(path):
                return path
        return None
    return resume


def read_training_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint for resuming (safe load); ``next_epoch`` is filled in for reference files."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'state_dict' entry)")
    ckpt.setdefault("next_epoch", int(ckpt.get("epoch", -1)) + 1)
    ckpt.setdefault("step_in_epoch", 0)
    ckpt["skipped"] = {k: int((ckpt.get("skipped") or {}).get(k, 0)) for k in SKIP_COUNTERS}
    ckpt["train_sums"] = _train_sums(ckpt.get("train_sums")) if int(ckpt["step_in_epoch"]) else None
    return ckpt


def _train_sums(saved: Any) -> Optional[Dict[str, float]]:
    """A mid-epoch checkpoint's training sums; ``None`` when it has none (written before they were
    recorded), and then the resumed epoch's numbers cover the steps after the resume only."""
    keys = (*TRAIN_SUMS, "time_s")
    if not isinstance(saved, Mapping) or not all(isinstance(saved.get(k), (int, float)) for k in keys):
        return None
    return {k: float(saved[k]) for k in keys}


def read_resume(path: str, auto: bool) -> Dict[str, Any]:
    """:func:`read_training_checkpoint`, its errors saying what to do instead (``auto``: found by --resume auto)."""
    try:
        return read_training_checkpoint(path)
    except CheckpointError as exc:
        hint = "pass another --resume file, or --resume none to start over"
        if auto:
            best = os.path.join(os.path.dirname(path), BEST_NAME)
            hint = "move it away or pass --resume none to start over" + (
                f" ({BEST_NAME} beside it holds the best epoch)" if os.path.isfile(best) and best != path else "")
        raise CheckpointError(f"cannot resume: {str(exc).rstrip('.')}; {hint}") from None


def resumed_flags(flags: Mapping[str, Any], ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """The flags a resumed run records: this call's, but ``pretrained`` as the run started.

    A resume takes every weight from the checkpoint and never reads ``--pretrained``, so the
    initialisation the run was started from stays in its record whatever this call passes."""
    saved = ckpt.get("args") or {}
    return {**flags, "pretrained": saved["pretrained"]} if "pretrained" in saved else dict(flags)


def check_resume(ckpt: Mapping[str, Any], source: str, config: Mapping[str, Any], flags: Mapping[str, Any],
                 layout: Mapping[str, int], classes: Optional[Sequence[str]] = None) -> None:
    """The checkpoint to resume (``source`` names it) must be of this run's model, trained with this
    run's recipe (``flags``: this run's :meth:`~n2uq.run_config.TrainConfig.flags`) on this run's
    class folders (``classes``; a label is the index of its sorted folder, so a renamed, added or
    removed folder changes the labels) and, when it stopped inside an epoch, of this run's data
    layout (``--batch_size``, ``--seed``, ``layout``: ``world_size`` and ``train_images``); raises
    :class:`~n2uq.cli.UsageError` otherwise.

    The checkpoint's flags are read from its ``args`` entry, the ``{flag: value}`` dictionary every
    checkpoint of this project records; a file of the reference's format records none and is
    checked by its model only."""
    saved = ckpt.get("config") or {}
    if not saved:  # a reference checkpoint: what its state dict says
        try:
            saved = infer_config(ckpt["state_dict"]).as_dict()
        except CheckpointError as exc:
            if not config.get("full_precision"):
                raise UsageError(f"{source} is not a checkpoint of an N2UQ model ({str(exc).rstrip('.')}); pass a "
                                 f"checkpoint of this run's model, or --resume none (or another --save) to start a "
                                 f"new run") from None
            saved = {}
    diffs = [f"{k} {saved.get(k)} vs {config.get(k)}" for k in _CONFIG_KEYS
             if k in saved and saved.get(k) != config.get(k) and not (k == "full_precision" and not saved[k])]
    if config.get("full_precision") and not saved.get("full_precision") and saved:
        diffs.append("a quantized model vs a full-precision run")
    if diffs:
        raise UsageError(f"{source} holds another model ({', '.join(diffs)}: checkpoint vs this run); "
                         f"pass the flags it was trained with, or --resume none (or another --save) to start "
                         f"a new run")
    trained_on = ckpt.get("classes")  # none in a file of the reference's format
    difference = class_difference(trained_on, classes, "this run's data") if trained_on and classes else None
    if difference:
        raise UsageError(f"{source} was trained on other class folders ({difference}), and resuming would change "
                         f"what its labels mean mid-run; pass the --data it was trained on, or --resume none (or "
                         f"another --save) to start a new run")
    if int(ckpt["step_in_epoch"]) > 0:
        _check_layout(ckpt, source, {"--batch_size": flags.get("batch_size"), "--seed": flags.get("seed"),
                                     "process count": layout["world_size"], "train images": layout["train_images"]})
    recipe = recipe_differences(ckpt.get("args"), flags)
    if recipe:
        raise UsageError(f"{source} was trained with another recipe ({', '.join(recipe)}: checkpoint vs now), and "
                         f"resuming would change it mid-run; pass the flags it was trained with, or --resume none "
                         f"(or another --save) to start a new run")


def recipe_differences(saved_args: Any, flags: Mapping[str, Any], run_control: AbstractSet[str] = RUN_CONTROL_FLAGS,
                       same: Callable[[str, Any, Any], bool] = lambda _name, a, b: a == b) -> List[str]:
    """``"--flag SAVED vs NOW"`` for each recipe flag (not in ``run_control``) whose value in ``flags``
    differs (``same(name, saved, now)`` false) from a checkpoint's recorded ``args``; none when it
    records none (reference format).

    A flag the checkpoint does not record (written before the flag existed) counts as its default."""
    if not isinstance(saved_args, Mapping) or not saved_args:
        return []
    defaults = TrainConfig().flags()
    found = []
    for name, now in flags.items():
        if name in run_control:
            continue
        if name in saved_args:
            before = saved_args[name]
        elif name in defaults:
            before = defaults[name]
        else:  # an optional flag the checkpoint's script did not have either (quantize_downsample)
            continue
        if not same(name, before, now):
            found.append(f"--{name} {before} vs {now}")
    return found


def carry_best(resume_path: str, run_dir: str, best_top1: float) -> Tuple[Optional[str], List[str]]:
    """The file that holds the best epoch's weights of a run resumed from ``resume_path`` into
    ``run_dir`` (``None`` when there is none), and the lines to print about it.

    In the checkpoint's own folder that is its ``model_best.pth.tar``. A run resumed into another
    folder (``--resume FILE`` with another ``--save``) copies the best epoch's file there — the
    ``model_best.pth.tar`` beside the checkpoint, or the checkpoint itself when it is one — so that
    the new folder holds the whole run; only a file that records the checkpoint's best top-1
    (``best_top1``) is copied, any other is the best of something else. Call it on the process
    that writes."""
    best_here = os.path.join(run_dir, BEST_NAME)
    if os.path.realpath(os.path.dirname(resume_path)) == os.path.realpath(run_dir):
        return (best_here if os.path.isfile(best_here) else None), []
    source = resume_path if os.path.basename(resume_path) == BEST_NAME else os.path.join(
        os.path.dirname(resume_path), BEST_NAME)
    try:
        recorded = float(read_checkpoint(source).get("best_top1_acc", -1.0)) if os.path.isfile(source) else None
    except (CheckpointError, AttributeError, TypeError, ValueError):
        recorded = None
    if recorded != best_top1:
        if best_top1 <= 0:
            return None, []
        found = "holds another best" if recorded is not None else "is not there"
        return None, [f"the best epoch so far (top-1 {best_top1:.2f}) stays with the earlier run: {source} {found}, "
                      f"so {run_dir} gets a {BEST_NAME} only when this run beats it"]
    os.makedirs(run_dir, exist_ok=True)
    with atomic_path(best_here) as tmp:
        shutil.copyfile(source, tmp)
    return best_here, [f"copied the best epoch so far (top-1 {best_top1:.2f}) from {source} to {best_here}"]


def _check_layout(ckpt: Mapping[str, Any], source: str, now: Mapping[str, Any]) -> None:
    saved_args = ckpt.get("args") or {}
    before = {"--batch_size": saved_args.get("batch_size"), "--seed": saved_args.get("seed"),
              "process count": ckpt.get("world_size"), "train images": ckpt.get("train_images")}
    diffs = [f"{k} {before[k]} vs {now[k]}" for k in before if before[k] is not None and before[k] != now[k]]
    if diffs:
        raise UsageError(f"{source} stopped inside epoch {int(ckpt['next_epoch']) + 1} (step "
                         f"{ckpt['step_in_epoch']}) and this run differs ({', '.join(diffs)}: checkpoint vs "
                         f"now), so samples would be repeated or skipped; resume with the same values")


def restore_training(parts: TrainingParts, ckpt: Mapping[str, Any], source: str,
                     alpha_patterns: Sequence[str]) -> Tuple[TrainProgress, List[str]]:
    """Load weights (strictly), optimizer, schedule, AMP scaler and RNG states; return the position
    and the lines to print about what was restored.

    A file of the reference's format has its Adam state mapped onto this run's groups (or skipped,
    saying why) and its schedule replayed; ``alpha_patterns`` are the reference's alpha-group rules
    of this architecture.
    """
    load_state_dict_strict(parts.model, ckpt["state_dict"], source=source)
    progress = TrainProgress(int(ckpt["next_epoch"]), int(ckpt["step_in_epoch"]),
                             float(ckpt.get("best_top1_acc", 0.0)), dict(ckpt["skipped"]), ckpt.get("train_sums"))
    notes: List[str] = []
    if is_reference_checkpoint(ckpt):
        state, what = map_reference_adam_state(parts.optimizer, parts.model, ckpt.get("optimizer"), alpha_patterns)
        if state is not None:
            parts.optimizer.load_state_dict(state)
        else:
            what = f"Adam state not restored ({what}); Adam starts afresh"
        finished = progress.next_epoch  # a reference file is written at the end of an epoch
        replay_schedule(parts.scheduler, finished)
        notes.append(f"checkpoint of the reference's format: {what}; learning-rate schedule replayed over "
                     f"{finished} finished epoch(s)")
    else:
        _load_optimizer(parts, ckpt["optimizer"], source)
        if ckpt.get("scheduler"):
            parts.scheduler.load_state_dict(ckpt["scheduler"])
        if parts.scaler is not None and ckpt.get("scaler"):
            parts.scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng"):
        restore_rng(ckpt["rng"])
    return progress, notes


def _load_optimizer(parts: TrainingParts, saved: Mapping[str, Any], source: str) -> None:
    try:
        parts.optimizer.load_state_dict(saved)
    except ValueError as exc:
        raise UsageError(f"{source}: its Adam state does not fit this run's parameter groups ({exc}); resume with "
                         f"the --alpha_group it was trained with, or --resume none to start over") from None
