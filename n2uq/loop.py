"""One pass over the data: :func:`train_one_epoch` (the training steps of one epoch) and
:func:`evaluate` (validation), with explicit inputs in the manner of torchvision's reference scripts.

Faults inside a pass are decided alike on every rank (docs/reliability.md): an unreadable image
raises :class:`~n2uq.data.BadImageError` naming it unless ``--skip_bad_images``; a non-finite loss
raises :class:`NonFiniteError` before the optimizer step unless ``--skip_nonfinite``. The settings
come from the run's :class:`~n2uq.run_config.TrainConfig` (:class:`LoopContext`).
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from n2uq import data as D
from n2uq.distributed import DistEnv, all_ranks_sum, all_reduce_sum, gather_lists
from n2uq.losses import kd_loss, label_smooth_ce
from n2uq.metrics import MetricsLogger, topk_correct
from n2uq.run_config import TrainConfig
from n2uq.train_state import SKIP_COUNTERS, TRAIN_SUMS, TrainingParts

__all__ = ["NonFiniteError", "LoopContext", "EpochCursor", "autocast", "say", "evaluate", "train_one_epoch"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(RuntimeError):
    """The loss (or, at a save, the weights) stopped being finite; nothing was saved."""


@dataclass(frozen=True)
class LoopContext:
    """Where a pass runs and how: this process's place, the run's configuration, the metrics log (rank 0)."""

    env: DistEnv
    cfg: TrainConfig
    logger: Optional[MetricsLogger] = None


@dataclass
class EpochCursor:
    """The epoch in progress: ``done`` batches of ``steps_in_epoch``, ``start_step`` of them before this
    pass (a resumed epoch). :func:`train_one_epoch` advances ``done`` after every step (a skipped one
    too), so after an exception it is the position before the failing batch. ``skipped`` counts
    unreadable images and left-out batches of the whole epoch (updated in place).

    ``sums`` (float64, :data:`~n2uq.train_state.TRAIN_SUMS`) is this process's share of the epoch's
    training loss and hits, added to after every step; a resumed epoch starts it (on one rank) from
    the checkpoint's totals, and then ``sums_from`` is 0 and ``time_before`` the training seconds of
    the steps before. Without them (``sums_from = start_step``) the numbers cover this pass only.
    """

    epoch: int
    start_step: int
    steps_in_epoch: int
    done: int = 0
    skipped: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_COUNTERS, 0))
    sums: Optional[torch.Tensor] = None
    sums_from: int = 0
    time_before: float = 0.0
    pass_started: float = 0.0

    def __post_init__(self) -> None:
        self.done = max(self.done, self.start_step)

    def epoch_sums(self, device: torch.device) -> Dict[str, float]:
        """The epoch's training sums so far over all ranks, and its training seconds (call on every rank)."""
        sums = torch.zeros(len(TRAIN_SUMS), dtype=torch.float64, device=device) if self.sums is None else self.sums
        totals = all_reduce_sum(sums.clone()).tolist()
        return {**dict(zip(TRAIN_SUMS, totals)), "time_s": self.time_before + time.time() - self.pass_started}


def autocast(device: torch.device, amp: str = "none"):
    """``torch.autocast`` for ``--amp bf16|fp16``, a no-op context for ``none``."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def say(env: DistEnv, *lines: str) -> None:
    """Print ``lines`` on rank 0 (through tqdm, so progress bars stay intact)."""
    if env.is_main:
        for line in lines:
            tqdm.write(line)


def _progress_bar(iterable, total: int, desc: str, enabled: bool):
    interactive = enabled and os.isatty(2)
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30.0)


def _to_device(images: torch.Tensor, target: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


def _name_bad(bad: Sequence[D.BadSample]) -> str:
    more = f" (+{len(bad) - 1} more unreadable)" if len(bad) > 1 else ""
    return bad[0].describe() + more


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none", channels_last: bool = False,
             progress: bool = False, desc: str = "val", skip_bad: bool = False) -> Dict[str, Any]:
    """Top-1/top-5 (percent), mean CE loss and image count over ``loader``, summed over all ranks.

    Use a loader whose sampler gives each image to exactly one rank (``n2uq.data.ShardSampler``)
    and every image is counted once. An unreadable image raises :class:`~n2uq.data.BadImageError`
    naming it (on every rank, after the loop), or with ``skip_bad`` is left out: ``count`` is then
    the number of images evaluated, ``skipped`` the number left out and ``skipped_images`` their
    paths, so ``count + skipped`` is the size of the split. Leaves the model in eval mode.
    """
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, count, unreadable
    bad_here: List[D.BadSample] = []
    for batch in _progress_bar(loader, len(loader), desc, progress):
        images, target, bad = D.split_batch(batch)
        bad_here += bad
        sums[4] += len(bad)
        if target.numel() == 0:
            continue
        images, target = _to_device(images, target, device, channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        sums[0] += nn.functional.cross_entropy(logits, target, reduction="sum").double()
        sums[1:3] += topk_correct(logits, target, (1, 5)).to(device)
        sums[3] += target.numel()
    all_reduce_sum(sums)
    loss, top1, top5, count, unreadable = sums.tolist()
    bad_all = gather_lists(bad_here) if unreadable else []
    if bad_all and not skip_bad:
        raise D.BadImageError(f"{_name_bad(bad_all)} while evaluating ({desc}); replace or remove the file, or pass "
                              f"--skip_bad_images to leave unreadable images out (they are counted)")
    count_ = max(count, 1.0)
    return {"top1": 100.0 * top1 / count_, "top5": 100.0 * top5 / count_, "loss": loss / count_,
            "count": int(count), "skipped": int(unreadable), "skipped_images": [b.path for b in bad_all]}


def train_one_epoch(parts: TrainingParts, loader, ctx: LoopContext, cursor: EpochCursor,
                    after_step: Optional[Callable[[int], bool]] = None) -> Dict[str, Any]:
    """Train on this rank's shard from ``cursor.start_step``; the epoch's loss and top-1/top-5 (percent)
    over all ranks, from step ``from_step`` on (0 unless a resumed epoch's checkpoint held no sums).

    The loss is :func:`~n2uq.losses.kd_loss` against ``parts.teacher`` when there is one, else
    label-smoothed cross-entropy. ``after_step(batches of the epoch done)`` runs after every step
    (also a skipped one); when it returns True the pass ends there (``stopped`` in the result).

    Faults, decided alike on every rank: unreadable images raise :class:`~n2uq.data.BadImageError`
    (``cursor.done`` is then the position before the batch) unless ``--skip_bad_images``, which
    trains on the readable rest of the batch and skips the step when a rank has fewer than two left
    (BatchNorm in training mode needs two); a non-finite loss raises :class:`NonFiniteError` before
    the optimizer step unless ``--skip_nonfinite``, which skips the step (the AMP scaler is neither
    stepped nor updated). ``cursor.skipped`` counts ``bad_images``, ``nonfinite_batches`` and
    ``short_batches``.
    """
    env, cfg = ctx.env, ctx.cfg
    parts.stepped.train()
    if cursor.sums is None:
        cursor.sums = torch.zeros(len(TRAIN_SUMS), dtype=torch.float64, device=env.device)
    sums = cursor.sums  # loss·n, top-1, top-5, n
    images_before = sums[3].item()
    steps = len(loader)
    bar = _progress_bar(loader, steps, f"epoch {cursor.epoch + 1}/{cfg.optim.epochs}",
                        env.is_main and not cfg.run.no_progress)
    t0 = cursor.pass_started = time.time()
    stopped = False
    for step, batch in enumerate(bar, start=cursor.start_step):
        images, target, bad = D.split_batch(batch)
        if not _skip_for_unreadable(bad, target, ctx, cursor, step):
            _train_step(parts, (images, target), ctx, cursor, step, sums)
        cursor.done = step + 1
        done = cursor.done - cursor.start_step
        if env.is_main and (done % 10 == 0 or done == steps):
            seen, count = (sums[3].item() - images_before) * env.world_size, max(sums[3].item(), 1.0)
            bar.set_postfix(loss=f"{sums[0].item() / count:.3f}", top1=f"{100 * sums[1].item() / count:.1f}",
                            img_s=f"{seen / (time.time() - t0):.0f}", refresh=False)
        if after_step is not None and after_step(cursor.done):
            stopped = True
            break
    elapsed = cursor.time_before + time.time() - t0
    loss, top1, top5, images = all_reduce_sum(sums.clone()).tolist()
    n = max(images, 1.0)
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "images": int(images),
            "img_per_s": images / max(elapsed, 1e-9), "time_s": elapsed, "from_step": cursor.sums_from,
            "stopped": stopped, "skipped": dict(cursor.skipped)}


def _skip_for_unreadable(bad: List[D.BadSample], target: torch.Tensor, ctx: LoopContext, cursor: EpochCursor,
                         step: int) -> bool:
    """Count (or raise for) this step's unreadable images on all ranks; True when every rank skips the step.

    A rank left with fewer than two readable images makes all skip it (BatchNorm needs two).
    """
    skip = ctx.cfg.data.skip_bad_images
    short = target.numel() == 0 or (bool(bad) and target.numel() == 1)  # shrunk below what BatchNorm needs
    n_bad, n_short = all_ranks_sum([len(bad), short], ctx.env.device)
    if n_bad:
        bad_all = gather_lists(bad)
        where = f"epoch {cursor.epoch + 1}, step {step + 1}"
        if not skip:
            raise D.BadImageError(f"{_name_bad(bad_all)} in {where}; replace or remove the file, or pass "
                                  f"--skip_bad_images to skip unreadable images (they are counted in the logs)")
        for b in bad_all:
            say(ctx.env, f"skipped {b.describe()} in {where}")
            if ctx.logger is not None:
                ctx.logger.log({"event": "bad_image", "split": "train", "epoch": cursor.epoch, "step": step,
                                "path": b.path, "reason": b.reason})
        cursor.skipped["bad_images"] += int(n_bad)
    if n_short:
        cursor.skipped["short_batches"] += 1
    return bool(n_short)


def _train_step(parts: TrainingParts, batch: Tuple[torch.Tensor, torch.Tensor], ctx: LoopContext,
                cursor: EpochCursor, step: int, sums: torch.Tensor) -> None:
    """Forward, backward and (unless the loss is non-finite) the optimizer step; adds to ``sums``."""
    env, run = ctx.env, ctx.cfg.run
    images, target = _to_device(*batch, env.device, run.channels_last)
    with autocast(env.device, run.amp):
        logits = parts.stepped(images)
        if parts.teacher is not None:
            with torch.no_grad():
                teacher_logits = parts.teacher(images)
            loss = kd_loss(logits, teacher_logits)
        else:
            loss = label_smooth_ce(logits, target, ctx.cfg.optim.label_smooth)
    parts.optimizer.zero_grad(set_to_none=True)
    (parts.scaler.scale(loss) if parts.scaler is not None else loss).backward()  # every rank: DDP reduces here
    if _skip_nonfinite_loss(loss, parts.optimizer, ctx, cursor, step):
        return
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    n = target.numel()
    with torch.no_grad():
        sums[0] += loss.detach().double() * n
        sums[1:3] += topk_correct(logits.detach().float(), target, (1, 5)).to(env.device)
        sums[3] += n
    if ctx.logger is not None and (step + 1) % run.log_every == 0:
        global_step = cursor.epoch * cursor.steps_in_epoch + step + 1
        ctx.logger.scalars({"train/loss_step": loss.item()}, global_step)


def _skip_nonfinite_loss(loss: torch.Tensor, optimizer: torch.optim.Optimizer, ctx: LoopContext,
                         cursor: EpochCursor, step: int) -> bool:
    """False for a finite loss (on every rank). Otherwise raise :class:`NonFiniteError`, or with
    ``--skip_nonfinite`` drop the gradients, count and log the batch and return True."""
    check = torch.stack([(~torch.isfinite(loss.detach())).double(), loss.detach().double()])
    if not all_reduce_sum(check)[0].item():  # the summed loss is non-finite too: reported on every rank
        return False
    value = check[1].item()
    where = f"epoch {cursor.epoch + 1}, step {step + 1}/{cursor.steps_in_epoch}"
    if not ctx.cfg.run.skip_nonfinite:
        raise NonFiniteError(f"non-finite loss ({value}) in {where}; stopped before the optimizer step")
    optimizer.zero_grad(set_to_none=True)
    cursor.skipped["nonfinite_batches"] += 1
    say(ctx.env, f"skipped a batch with a non-finite loss ({value}) in {where}")
    if ctx.logger is not None:
        ctx.logger.log({"event": "skipped_batch", "reason": "nonfinite_loss", "epoch": cursor.epoch,
                        "step": step, "loss": str(value)})
    return True
