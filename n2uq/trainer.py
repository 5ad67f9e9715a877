"""The epoch loop of a training run: schedule, train, validate, checkpoint, log — and what to save
and say when a stop is requested or a fault interrupts an epoch (docs/reliability.md).

:class:`Trainer` holds the objects of one run and its position (:class:`TrainerState`); every
checkpoint it writes is the position reached, so a run resumed from it continues bit-identically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from n2uq import data as D
from n2uq.atomic_io import atomic_save
from n2uq.distributed import all_ranks_sum, barrier, broadcast_buffers
from n2uq.loop import EpochCursor, LoopContext, NonFiniteError, evaluate, say, train_one_epoch
from n2uq.recipe import scheduler_step
from n2uq.run_control import RunControl
from n2uq.train_state import (
    BEST_NAME,
    CHECKPOINT_NAME,
    TRAIN_SUMS,
    RunRecord,
    TrainingParts,
    TrainProgress,
    build_checkpoint,
)

__all__ = ["TrainData", "TrainerState", "Trainer", "check_finite_weights"]


@dataclass
class TrainData:
    """The loaders of a run: ``per_rank_batch`` images per step and process, ``val_size`` images in val/."""

    train_loader: Any
    val_loader: Any
    val_size: int
    per_rank_batch: int


@dataclass
class TrainerState:
    """Where the run stands.

    ``progress``: the position reached (what the next checkpoint holds); ``cursor``: the epoch in
    progress; ``saved_step``: its last step already in a checkpoint; ``last_good``: the last good
    checkpoint and its position (``None`` before the first save), for error messages; ``best_file``:
    the file holding the weights of ``progress.best_top1`` (``None`` while there is none).
    """

    progress: TrainProgress
    cursor: Optional[EpochCursor] = None
    saved_step: int = 0
    last_good: Optional[str] = None
    best_file: Optional[str] = None


def check_finite_weights(model: nn.Module, progress: TrainProgress, device: torch.device) -> None:
    """Refuse to save non-finite weights or buffers (all ranks take the same decision)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any().double() if tensors else torch.zeros(())
    if all_ranks_sum([bad.item()], device)[0]:
        raise NonFiniteError(f"non-finite weights at the save of {progress.describe()}; not saved")


class Trainer:
    """Runs the epochs of one training run from ``state.progress`` to ``--epochs``.

    ``parts``: the model, teacher, optimizer, schedule and scaler; ``data``: the loaders; ``ctx``:
    this process, the run's configuration and the metrics log; ``record``: what every checkpoint says about the
    run; ``run_dir``: where checkpoints go; ``control``: signals and budgets of this invocation.
    """

    def __init__(self, parts: TrainingParts, data: TrainData, ctx: LoopContext, record: RunRecord, run_dir: str,
                 control: RunControl, state: TrainerState):
        self.parts, self.data, self.ctx, self.record = parts, data, ctx, record
        self.run_dir, self.control, self.state = run_dir, control, state
        self.env, self.cfg = ctx.env, ctx.cfg

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        """Train until ``--epochs``, a budget or a signal; return the last epoch's validation ({} if none)."""
        last_val: Dict[str, Any] = {}
        try:
            for epoch in range(self.state.progress.next_epoch, self.cfg.optim.epochs):
                if self.control.stop_before_epoch():
                    say(self.env, f"stopping before epoch {epoch + 1}: {self.control.reason()}; run again to resume")
                    break
                last_val, stopped = self.run_epoch(epoch)
                if stopped:
                    say(self.env, f"stopped in epoch {epoch + 1} after step {self.state.progress.step_in_epoch}: "
                                  f"{self.control.reason()}; checkpoint saved, run again to resume")
                    break
                self.control.epoch_done()
        except NonFiniteError as exc:
            kept_at, again = ((f"the last good state is {self.state.last_good}", "run again to resume from it")
                              if self.state.last_good else ("no checkpoint was written yet", "run again"))
            raise NonFiniteError(f"{exc}; nothing was saved, {kept_at}. Lower --learning_rate or check the data "
                                 f"and {again}, or pass --skip_nonfinite to skip such batches") from None
        return last_val

    def run_epoch(self, epoch: int) -> Tuple[Dict[str, Any], bool]:
        """Train (from ``progress.step_in_epoch``), validate, checkpoint and log one epoch.

        Returns ``(val, stopped)``; when a stop is requested inside the epoch, a mid-epoch
        checkpoint is written and validation is skipped. ``--save_every_steps`` writes one too. An
        unreadable image (without ``--skip_bad_images``) saves the position before its batch, then raises.
        """
        progress = self.state.progress
        if progress.step_in_epoch == 0:
            scheduler_step(self.parts.scheduler)  # at the start of the epoch, as the reference
            progress = self.state.progress = TrainProgress(progress.next_epoch, 0, progress.best_top1)
        loader = self.data.train_loader
        loader.sampler.set_epoch(epoch, progress.step_in_epoch, self.data.per_rank_batch)
        cursor = EpochCursor(epoch, progress.step_in_epoch, progress.step_in_epoch + len(loader),
                             skipped=dict(progress.skipped))
        self._restore_sums(cursor, progress.train_sums)
        self.state.cursor, self.state.saved_step = cursor, progress.step_in_epoch
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.parts.optimizer.param_groups)}
        train = self._train(cursor)
        if train["stopped"]:
            self.state.progress = self._position(cursor.done)
            return {}, True
        broadcast_buffers(self.parts.model)
        val = self._validate(cursor)
        is_best = val["top1"] > progress.best_top1
        self.state.progress = TrainProgress(epoch + 1, 0, max(progress.best_top1, val["top1"]))
        self._log_epoch(cursor, lrs, train, val)
        self.save(self.state.progress, val, best=is_best)
        self._print_epoch(cursor, lrs, train, val)
        return val, False

    def _restore_sums(self, cursor: EpochCursor, saved: Optional[Dict[str, float]]) -> None:
        """Start the epoch's training sums from a mid-epoch checkpoint's totals (on rank 0 only, so the
        sum over ranks stays the total); without them the numbers cover the steps from here on."""
        cursor.sums = torch.zeros(len(TRAIN_SUMS), dtype=torch.float64, device=self.env.device)
        cursor.sums_from = cursor.start_step
        if cursor.start_step and saved is not None:
            if self.env.is_main:
                cursor.sums += torch.tensor([saved[k] for k in TRAIN_SUMS], dtype=torch.float64,
                                            device=self.env.device)
            cursor.sums_from, cursor.time_before = 0, saved["time_s"]

    def after_step(self, done: int) -> bool:
        """Called after every step with the epoch's batches done: save when asked; True to stop here."""
        cursor, every = self.state.cursor, self.cfg.run.save_every_steps
        stop = self.control.step_done() and done < cursor.steps_in_epoch  # the last step finishes the epoch first
        if stop or (every and done % every == 0 and done < cursor.steps_in_epoch):
            self.save(self._position(done))
            self.state.saved_step = done
        return stop

    def _position(self, done: int) -> TrainProgress:
        """The position after ``done`` batches of the epoch in progress (a collective: call on every rank)."""
        cursor = self.state.cursor
        sums = cursor.epoch_sums(self.env.device) if cursor.sums_from == 0 else None
        return TrainProgress(cursor.epoch, done, self.state.progress.best_top1, dict(cursor.skipped), sums)

    def _train(self, cursor: EpochCursor) -> Dict[str, Any]:
        try:
            return train_one_epoch(self.parts, self.data.train_loader, self.ctx, cursor, after_step=self.after_step)
        except D.BadImageError as exc:
            done = cursor.done
            if done == 0:  # nothing done in this epoch: the checkpoint of the previous one is the position
                raise
            if done > self.state.saved_step:
                self.save(self._position(done))
            raise D.BadImageError(f"{exc}; the position before it (epoch {cursor.epoch + 1} after step {done}) is "
                                  f"saved, run again to resume there") from None

    def _validate(self, cursor: EpochCursor) -> Dict[str, Any]:
        run = self.cfg.run
        try:
            val = evaluate(self.parts.model, self.data.val_loader, self.env.device, run.amp, run.channels_last,
                           progress=self.env.is_main and not run.no_progress, skip_bad=self.cfg.data.skip_bad_images)
        except D.BadImageError as exc:
            if cursor.steps_in_epoch > self.state.saved_step:
                self.save(self._position(cursor.steps_in_epoch))  # the trained epoch, before its validation
            raise D.BadImageError(f"{exc}; the epoch's training is saved, run again to validate and go on") from None
        if val["count"] + val["skipped"] != self.data.val_size:
            raise RuntimeError(f"validation counted {val['count']} images (+{val['skipped']} unreadable), "
                               f"expected {self.data.val_size}")
        for path in val.pop("skipped_images"):
            say(self.env, f"left out unreadable validation image {path}")
            self.ctx.logger.log({"event": "bad_image", "split": "val", "epoch": cursor.epoch, "path": path})
        return val

    # -- checkpoints and logs ---------------------------------------------------------------------

    def save(self, progress: TrainProgress, val: Optional[Dict[str, float]] = None, best: bool = False) -> None:
        """Write ``progress`` to the run's checkpoint (and ``model_best.pth.tar`` first when ``best``)."""
        check_finite_weights(self.parts.model, progress, self.env.device)
        path, best_path = os.path.join(self.run_dir, CHECKPOINT_NAME), os.path.join(self.run_dir, BEST_NAME)
        if self.env.is_main:
            ckpt = build_checkpoint(self.parts, progress, self.record, val)
            if best:  # first: a kill in between leaves the older checkpoint, whose resume redoes this best
                atomic_save(ckpt, best_path)
            atomic_save(ckpt, path)
        barrier()
        if best:
            self.state.best_file = best_path
        self.state.last_good = f"{path} ({progress.describe()})"

    def _log_epoch(self, cursor: EpochCursor, lrs: Dict[str, float], train: Dict[str, Any],
                   val: Dict[str, Any]) -> None:
        logger, img_s = self.ctx.logger, train["img_per_s"]
        logger.log({"event": "epoch", "epoch": cursor.epoch, "lr": lrs, "train": train, "val": val,
                    "best_top1": self.state.progress.best_top1, "img_per_s": img_s, "skipped": cursor.skipped})
        logger.scalars({"train/loss": train["loss"], "train/top1": train["top1"], "train/top5": train["top5"],
                        "val/loss": val["loss"], "val/top1": val["top1"], "val/top5": val["top5"],
                        "train/img_per_s": img_s, **{f"lr/{k}": v for k, v in lrs.items()}}, cursor.epoch + 1)

    def _print_epoch(self, cursor: EpochCursor, lrs: Dict[str, float], train: Dict[str, Any],
                     val: Dict[str, Any]) -> None:
        trained = (f"train loss {train['loss']:.4f} top-1 {train['top1']:.2f}" if train["images"]
                   else "no training step in this invocation")
        if train["images"] and train["from_step"]:
            trained += (f" (steps {train['from_step'] + 1}-{cursor.steps_in_epoch} only: the checkpoint resumed "
                        f"from holds no sums of the steps before)")
        say(self.env, f"epoch {cursor.epoch + 1}/{self.cfg.optim.epochs} lr {lrs.get('other', 0.0):.3g} | {trained} | "
                      f"val top-1 {val['top1']:.2f} top-5 {val['top5']:.2f} (best {self.state.progress.best_top1:.2f})"
                      f" | {train['img_per_s']:.0f} img/s {train['time_s']:.0f}s"
                      f"{_skipped_note(cursor.skipped, val['skipped'])}")


def _skipped_note(skipped: Dict[str, int], val_skipped: int) -> str:
    parts = [f"{skipped['bad_images']} unreadable train image(s)" if skipped["bad_images"] else "",
             f"{val_skipped} unreadable val image(s)" if val_skipped else "",
             f"{skipped['nonfinite_batches']} non-finite-loss batch(es)" if skipped["nonfinite_batches"] else "",
             f"{skipped['short_batches']} batch(es) left with < 2 readable images" if skipped["short_batches"] else ""]
    parts = [p for p in parts if p]
    return f" | skipped {', '.join(parts)}" if parts else ""
