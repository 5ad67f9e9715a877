"""The training engine shared by ``resnet/train.py`` and ``mobilenetv2/train.py`` (SPEC §6).

``fit(build_model, args)``: torchrun/DDP or a single process, the paper's recipe (three Adam
groups, LambdaLR stepped at the start of every epoch, KD from a frozen teacher or label-smoothed
CE without one), full-precision initialisation with a report, exact resume, AMP, logging.
``evaluate(model, loader, device)`` is the validation used here and by ``scripts/evaluate.py``.

Faults (docs/reliability.md): an unreadable image stops the run with its path after saving the
position reached (``--skip_bad_images``: skipped and counted); a non-finite loss stops it without
a step or a save, so the last checkpoint stays the last good state (``--skip_nonfinite``: the
batch is skipped and counted); all ranks take the same decision at the same step.
"""

from __future__ import annotations

import json
import os
import random
import time
from argparse import Namespace
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from n2uq import data as D
from n2uq.checkpoint import CheckpointError, infer_config, load_state_dict_strict
from n2uq.cli import UsageError
from n2uq.distributed import DistEnv, all_reduce_sum, barrier, cleanup, init_distributed, is_distributed
from n2uq.losses import kd_loss, label_smooth_ce
from n2uq.metrics import MetricsLogger, topk_correct
from n2uq.pretrained import load_pretrained
from n2uq.recipe import RESNET_ALPHA_PATTERNS, build_optimizer, build_scheduler, scheduler_step
from n2uq.run_control import RunControl, all_ranks_sum, gather_lists
from n2uq.teacher import build_teacher
from n2uq.train_state import (
    BEST_NAME,
    CHECKPOINT_NAME,
    SKIP_COUNTERS,
    TrainProgress,
    atomic_save,
    build_checkpoint,
    read_training_checkpoint,
    remove_stale_temps,
    restore_rng,
)

__all__ = ["NonFiniteError", "fit", "train_one_epoch", "evaluate", "autocast", "configure_threads",
           "default_workers"]


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(RuntimeError):
    """The loss (or, at a save, the weights) stopped being finite; nothing was saved."""


def autocast(device: torch.device, amp: str = "none"):
    """``torch.autocast`` for ``--amp bf16|fp16``, a no-op context for ``none``."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def configure_threads(threads: int, env: DistEnv) -> None:
    """CPU threads per process: ``threads``, or cores / processes on this machine when 0."""
    if threads == 0 and env.device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // env.local_world_size)
    if threads > 0:
        torch.set_num_threads(threads)


def default_workers(env: DistEnv) -> int:
    """Loader workers per process when ``--workers`` is not given: cores per process, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) // env.local_world_size))


def _progress_bar(iterable, total: int, desc: str, enabled: bool):
    interactive = enabled and os.isatty(2)
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30.0)


def _to_device(images: torch.Tensor, target: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


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


def _name_bad(bad: Sequence[D.BadSample]) -> str:
    more = f" (+{len(bad) - 1} more unreadable)" if len(bad) > 1 else ""
    return bad[0].describe() + more


def train_one_epoch(model: nn.Module, teacher: Optional[nn.Module], loader, optimizer, scaler,
                    env: DistEnv, args: Namespace, epoch: int, logger: Optional[MetricsLogger] = None,
                    start_step: int = 0, after_step: Optional[Callable[[int], bool]] = None,
                    skipped: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """One pass over this rank's shard; returns loss and top-1/top-5 (percent) over all ranks.

    The loss is :func:`~n2uq.losses.kd_loss` against ``teacher`` when there is one, else
    label-smoothed cross-entropy. ``start_step`` numbers the first batch (resume inside an epoch).
    ``after_step(steps done in this epoch)`` runs after every step (also a skipped one); when it
    returns True the epoch ends there (``stopped`` in the result).

    Faults, decided alike on every rank: unreadable images raise :class:`~n2uq.data.BadImageError`
    (its ``steps_done`` attribute is the position before the batch) unless ``args.skip_bad_images``,
    which trains on the readable rest of the batch and skips the step when a rank has fewer than
    two left (BatchNorm in training mode needs two); a non-finite loss raises
    :class:`NonFiniteError` before the optimizer step unless ``args.skip_nonfinite``, which skips
    the step (the AMP scaler is neither stepped nor updated). ``skipped`` (updated in place) counts
    ``bad_images``, ``nonfinite_batches`` and ``short_batches``.
    """
    device = env.device
    skip_bad, skip_nonfinite = getattr(args, "skip_bad_images", False), getattr(args, "skip_nonfinite", False)
    skipped = dict.fromkeys(SKIP_COUNTERS, 0) if skipped is None else skipped
    model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss·n, top-1, top-5, n
    steps = len(loader)
    bar = _progress_bar(loader, steps, f"epoch {epoch + 1}/{args.epochs}", env.is_main and not args.no_progress)
    t0 = time.time()
    stopped = False
    for step, batch in enumerate(bar, start=start_step):
        images, target, bad = D.split_batch(batch)
        short = target.numel() == 0 or (bool(bad) and target.numel() == 1)  # shrunk below what BatchNorm needs
        n_bad, n_short = all_ranks_sum([len(bad), short], device)
        if n_bad:
            _unreadable_images(bad, epoch, step, skip_bad, logger, env)
            skipped["bad_images"] += int(n_bad)
        if n_short:  # a rank has fewer than 2 readable images left (BatchNorm needs 2): all skip the step
            skipped["short_batches"] += 1
        else:
            images, target = _to_device(images, target, device, args.channels_last)
            with autocast(device, args.amp):
                logits = model(images)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    loss = kd_loss(logits, teacher_logits)
                else:
                    loss = label_smooth_ce(logits, target, args.label_smooth)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()  # every rank: DDP reduces here
            check = torch.stack([(~torch.isfinite(loss.detach())).double(), loss.detach().double()])
            if all_reduce_sum(check)[0].item():  # the summed loss is non-finite too: reported on every rank
                value = check[1].item()
                where = f"epoch {epoch + 1}, step {step + 1}/{start_step + steps}"
                if not skip_nonfinite:
                    raise NonFiniteError(f"non-finite loss ({value}) in {where}; stopped before the optimizer step")
                optimizer.zero_grad(set_to_none=True)
                skipped["nonfinite_batches"] += 1
                _say(env, f"skipped a batch with a non-finite loss ({value}) in {where}")
                if logger is not None:
                    logger.log({"event": "skipped_batch", "reason": "nonfinite_loss", "epoch": epoch,
                                "step": step, "loss": str(value)})
            else:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                n = target.numel()
                with torch.no_grad():
                    sums[0] += loss.detach().double() * n
                    sums[1:3] += topk_correct(logits.detach().float(), target, (1, 5)).to(device)
                    sums[3] += n
                if logger is not None and (step + 1) % args.log_every == 0:
                    global_step = epoch * (steps + start_step) + step + 1
                    logger.scalars({"train/loss_step": loss.item()}, global_step)
        done = step + 1 - start_step
        if env.is_main and (done % 10 == 0 or done == steps):
            seen, count = sums[3].item() * env.world_size, max(sums[3].item(), 1.0)
            bar.set_postfix(loss=f"{sums[0].item() / count:.3f}", top1=f"{100 * sums[1].item() / count:.1f}",
                            img_s=f"{seen / (time.time() - t0):.0f}", refresh=False)
        if after_step is not None and after_step(step + 1):
            stopped = True
            break
    elapsed = time.time() - t0
    all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
            "images": int(sums[3].item()), "img_per_s": sums[3].item() / max(elapsed, 1e-9), "time_s": elapsed,
            "stopped": stopped, "skipped": dict(skipped)}


def _unreadable_images(bad: List[D.BadSample], epoch: int, step: int, skip: bool,
                       logger: Optional[MetricsLogger], env: DistEnv) -> None:
    """Log (``skip``) or raise for the unreadable images of this step on all ranks (all ranks call it)."""
    bad_all = gather_lists(bad)
    where = f"epoch {epoch + 1}, step {step + 1}"
    if not skip:
        exc = D.BadImageError(f"{_name_bad(bad_all)} in {where}; replace or remove the file, or pass "
                              f"--skip_bad_images to skip unreadable images (they are counted in the logs)")
        exc.steps_done = step  # type: ignore[attr-defined]
        raise exc
    for b in bad_all:
        _say(env, f"skipped {b.describe()} in {where}")
        if logger is not None:
            logger.log({"event": "bad_image", "split": "train", "epoch": epoch, "step": step, "path": b.path,
                        "reason": b.reason})


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running stats), the state that rank 0 saves."""
    if is_distributed():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _resolve_resume(resume: str, run_dir: str) -> Optional[str]:
    if resume == "none":
        return None
    if resume == "auto":
        path = os.path.join(run_dir, CHECKPOINT_NAME)
        return path if os.path.isfile(path) else None
    return resume


def _say(env: DistEnv, *lines: str) -> None:
    if env.is_main:
        for line in lines:
            tqdm.write(line)


def _plain_args(args: Namespace) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def fit(build_model: Callable[[int], nn.Module], args: Namespace,
        alpha_patterns: Sequence[str] = RESNET_ALPHA_PATTERNS, run_name: str = "run",
        config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train ``build_model(num_classes)`` with the flags of :func:`n2uq.cli.build_train_parser`.

    ``run_name`` is the folder under ``--save``; ``config`` (arch, n_bit, ...) is stored in the
    checkpoints. Returns ``{'run_dir', 'best_top1', 'last_val', 'next_epoch'}``.
    """
    env = init_distributed(args.device)
    try:
        return _fit(env, build_model, args, tuple(alpha_patterns), run_name, dict(config or {}))
    finally:
        cleanup()


def _fit(env: DistEnv, build_model, args: Namespace, alpha_patterns, run_name: str,
         config: Dict[str, Any]) -> Dict[str, Any]:
    configure_threads(args.threads, env)
    _seed_everything(args.seed)
    device = env.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    workers = default_workers(env) if args.workers is None else args.workers
    pin = device.type == "cuda"

    train_ds = D.image_folder(args.data, "train", D.train_transform(args.image_size, args.min_crop_scale))
    val_ds = D.image_folder(args.data, "val", D.val_transform(args.image_size, args.val_resize))
    if train_ds.classes != val_ds.classes:
        only_train = sorted(set(train_ds.classes) - set(val_ds.classes))
        only_val = sorted(set(val_ds.classes) - set(train_ds.classes))
        raise D.DataError(f"{args.data}: train/ and val/ have different class folders (only in train/: "
                          f"{', '.join(only_train[:3]) or '-'}; only in val/: {', '.join(only_val[:3]) or '-'}); "
                          f"give both the same class folders")
    num_classes = len(train_ds.classes)
    per_rank_batch = args.batch_size // env.world_size
    if len(train_ds) < args.batch_size:
        raise D.DataError(f"{args.data}/train has {len(train_ds)} images, fewer than one batch of "
                          f"{args.batch_size}; lower --batch_size")
    train_loader = D.build_train_loader(train_ds, per_rank_batch, env.rank, env.world_size, args.seed, workers, pin)
    val_loader = D.build_val_loader(val_ds, per_rank_batch, env.rank, env.world_size, workers, pin)

    model = build_model(num_classes)
    config = {**config, "num_classes": num_classes}
    run_dir = os.path.join(args.save, run_name)
    if env.is_main:
        for tmp in remove_stale_temps(run_dir):
            _say(env, f"removed {tmp}, left by a save that was interrupted")
    layout = {"world_size": env.world_size, "train_images": len(train_ds)}
    resume_path = _resolve_resume(args.resume, run_dir)
    ckpt = None
    if resume_path is not None:
        ckpt = _read_resume(resume_path, args.resume == "auto")
        source = f"--resume {resume_path}" if args.resume != "auto" else f"the run's checkpoint {resume_path}"
        _check_resume(ckpt, source, config, args, layout)
    else:
        report = load_pretrained(model, args.pretrained, config.get("arch", ""),
                                 bool(config.get("quantize_downsample", False)), args.models_dir)
        if report is not None and env.is_main:
            _say(env, report.summary())
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "pretrained_report.json"), "w", encoding="utf-8") as f:
                json.dump(report.as_dict(), f, indent=1)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, (args.momentum, 0.999),
                                alpha_patterns, all_ltq_a=args.alpha_group == "all_ltq")
    scheduler = build_scheduler(optimizer, args.epochs)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    progress = TrainProgress()
    if ckpt is not None:
        load_state_dict_strict(model, ckpt["state_dict"], source=resume_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("rng"):
            restore_rng(ckpt["rng"])
        progress = TrainProgress(int(ckpt["next_epoch"]), int(ckpt["step_in_epoch"]),
                                 float(ckpt.get("best_top1_acc", 0.0)), dict(ckpt["skipped"]))
        at = f", step {progress.step_in_epoch}" if progress.step_in_epoch else ""
        _say(env, f"resumed from {resume_path}: next epoch {progress.next_epoch + 1}{at}, "
                  f"best top-1 {progress.best_top1:.2f}")
        del ckpt

    teacher = build_teacher(args.teacher, args.teacher_weights, num_classes)
    if teacher is not None:
        teacher.to(device)
        if args.channels_last:
            teacher.to(memory_format=torch.channels_last)
    train_model: nn.Module = model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    logger = MetricsLogger(run_dir, enabled=env.is_main)
    n_params = sum(p.numel() for p in model.parameters())
    _say(env, f"{run_name}: {n_params / 1e6:.2f}M parameters, {num_classes} classes, "
              f"{len(train_ds)} train / {len(val_ds)} val images, {env.world_size} process(es) on {device.type}, "
              f"batch {args.batch_size} ({per_rank_batch} per process), "
              f"{'KD from ' + args.teacher if teacher is not None else 'label-smoothed CE (no teacher)'}")
    logger.log({"event": "start", "run": run_name, "world_size": env.world_size, "resume": resume_path,
                "next_epoch": progress.next_epoch, "step_in_epoch": progress.step_in_epoch,
                "args": _plain_args(args)})
    kept = {"at": f"{resume_path} ({_position(progress)})" if resume_path else None}  # the last good checkpoint

    def save(state: TrainProgress, val: Optional[Dict[str, float]] = None, best: bool = False) -> None:
        _check_finite_weights(model, state, device)
        if env.is_main:
            ckpt = build_checkpoint(model, optimizer, scheduler, scaler, state, args=_plain_args(args),
                                    config=config, classes=train_ds.classes, val=val, extra=layout)
            if best:  # first: a kill in between leaves the older checkpoint, whose resume redoes this best
                atomic_save(ckpt, os.path.join(run_dir, BEST_NAME))
            atomic_save(ckpt, os.path.join(run_dir, CHECKPOINT_NAME))
        barrier()
        kept["at"] = f"{os.path.join(run_dir, CHECKPOINT_NAME)} ({_position(state)})"

    last_val: Dict[str, float] = {}
    try:
        with RunControl(args.steps_per_run, args.epochs_per_run, device) as control:
            for epoch in range(progress.next_epoch, args.epochs):
                if control.stop_before_epoch():
                    _say(env, f"stopping before epoch {epoch + 1}: {control.reason()}; run again to resume")
                    break
                progress, last_val, stopped = _run_epoch(
                    env, args, epoch, progress, train_model, model, teacher, train_loader, val_loader,
                    len(val_ds), optimizer, scheduler, scaler, logger, control, save, per_rank_batch)
                if stopped:
                    _say(env, f"stopped in epoch {epoch + 1} after step {progress.step_in_epoch}: "
                              f"{control.reason()}; checkpoint saved, run again to resume")
                    break
                control.epoch_done()
    except NonFiniteError as exc:
        kept_at, again = ((f"the last good state is {kept['at']}", "run again to resume from it") if kept["at"]
                          else ("no checkpoint was written yet", "run again"))
        raise NonFiniteError(f"{exc}; nothing was saved, {kept_at}. Lower --learning_rate or check the data "
                             f"and {again}, or pass --skip_nonfinite to skip such batches") from None
    finally:
        logger.close()
    if progress.next_epoch >= args.epochs:
        _say(env, f"finished {args.epochs} epochs: best val top-1 {progress.best_top1:.2f} "
                  f"({os.path.join(run_dir, BEST_NAME)})")
    return {"run_dir": run_dir, "best_top1": progress.best_top1, "last_val": last_val,
            "next_epoch": progress.next_epoch, "step_in_epoch": progress.step_in_epoch}


def _position(state: TrainProgress) -> str:
    if state.step_in_epoch:
        return f"epoch {state.next_epoch + 1} after step {state.step_in_epoch}"
    return f"end of epoch {state.next_epoch}" if state.next_epoch else "before epoch 1"


def _read_resume(path: str, auto: bool) -> Dict[str, Any]:
    try:
        return read_training_checkpoint(path)
    except CheckpointError as exc:
        hint = ("move it away or pass --resume none to start over (model_best.pth.tar beside it holds the "
                "best epoch)") if auto else "pass another --resume file, or --resume none to start over"
        raise CheckpointError(f"cannot resume: {str(exc).rstrip('.')}; {hint}") from None


_CONFIG_KEYS = ("arch", "n_bit", "quantize_downsample", "num_classes", "full_precision")


def _check_resume(ckpt: Dict[str, Any], source: str, config: Dict[str, Any], args: Namespace,
                  layout: Dict[str, int]) -> None:
    """The checkpoint to resume (``source`` names it) must be of this run's model, and a mid-epoch
    one of this run's data layout."""
    saved = ckpt.get("config") or {}
    if not saved:  # a reference checkpoint: what its state dict says
        try:
            saved = infer_config(ckpt["state_dict"]).as_dict()
        except CheckpointError:
            saved = {}
    diffs = [f"{k} {saved.get(k)} vs {config.get(k)}" for k in _CONFIG_KEYS
             if k in saved and saved.get(k) != config.get(k) and not (k == "full_precision" and not saved[k])]
    if config.get("full_precision") and not saved.get("full_precision") and saved:
        diffs.append("a quantized model vs a full-precision run")
    if diffs:
        raise UsageError(f"{source} holds another model ({', '.join(diffs)}: checkpoint vs this run); "
                         f"pass the flags it was trained with, or --resume none (or another --save) to start "
                         f"a new run")
    if int(ckpt["step_in_epoch"]) > 0:
        before = {"--batch_size": (ckpt.get("args") or {}).get("batch_size"),
                  "--seed": (ckpt.get("args") or {}).get("seed"),
                  "process count": ckpt.get("world_size"), "train images": ckpt.get("train_images")}
        now = {"--batch_size": args.batch_size, "--seed": args.seed, "process count": layout["world_size"],
               "train images": layout["train_images"]}
        diffs = [f"{k} {before[k]} vs {now[k]}" for k in before if before[k] is not None and before[k] != now[k]]
        if diffs:
            raise UsageError(f"{source} stopped inside epoch {int(ckpt['next_epoch']) + 1} (step "
                             f"{ckpt['step_in_epoch']}) and this run differs ({', '.join(diffs)}: checkpoint vs "
                             f"now), so samples would be repeated or skipped; resume with the same values")


def _check_finite_weights(model: nn.Module, state: TrainProgress, device: torch.device) -> None:
    """Refuse to save non-finite weights or buffers (all ranks take the same decision)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any().double() if tensors else torch.zeros(())
    if all_ranks_sum([bad.item()], device)[0]:
        raise NonFiniteError(f"non-finite weights at the save of {_position(state)}; not saved")


def _run_epoch(env, args, epoch, progress, train_model, model, teacher, train_loader, val_loader, val_size,
               optimizer, scheduler, scaler, logger, control, save, per_rank_batch):
    """Train (from ``progress.step_in_epoch``), validate, checkpoint and log one epoch.

    Returns ``(progress, val, stopped)``; when a stop is requested inside the epoch, a mid-epoch
    checkpoint is written and validation is skipped. ``--save_every_steps`` writes one too. An
    unreadable image (without ``--skip_bad_images``) saves the position before its batch, then raises.
    """
    device = env.device
    if progress.step_in_epoch == 0:
        scheduler_step(scheduler)  # at the start of the epoch, as the reference
        progress = TrainProgress(progress.next_epoch, 0, progress.best_top1)
    train_loader.sampler.set_epoch(epoch, progress.step_in_epoch, per_rank_batch)
    steps_in_epoch = progress.step_in_epoch + len(train_loader)
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
    best_so_far = progress.best_top1
    skipped = dict(progress.skipped)
    last_done, saved_at = [progress.step_in_epoch], [progress.step_in_epoch]

    def at(done: int) -> TrainProgress:
        return TrainProgress(epoch, done, best_so_far, dict(skipped))

    def after_step(done: int) -> bool:
        last_done[0] = done
        stop = control.step_done() and done < steps_in_epoch  # the last step finishes the epoch first
        if stop or (args.save_every_steps and done % args.save_every_steps == 0 and done < steps_in_epoch):
            save(at(done))
            saved_at[0] = done
        return stop

    try:
        train = train_one_epoch(train_model, teacher, train_loader, optimizer, scaler, env, args, epoch, logger,
                                start_step=progress.step_in_epoch, after_step=after_step, skipped=skipped)
    except D.BadImageError as exc:
        done = getattr(exc, "steps_done", 0)
        if done == 0:  # nothing done in this epoch: the checkpoint of the previous one is the position
            raise
        if done > saved_at[0]:
            save(at(done))
        raise D.BadImageError(f"{exc}; the position before it (epoch {epoch + 1} after step {done}) is saved, "
                              f"run again to resume there") from None
    if train["stopped"]:
        return at(last_done[0]), {}, True
    _sync_buffers(model)
    try:
        last_val = evaluate(model, val_loader, device, args.amp, args.channels_last,
                            progress=env.is_main and not args.no_progress, skip_bad=args.skip_bad_images)
    except D.BadImageError as exc:
        if steps_in_epoch > saved_at[0]:
            save(at(steps_in_epoch))  # the trained epoch, before its validation
        raise D.BadImageError(f"{exc}; the epoch's training is saved, run again to validate and go on") from None
    if last_val["count"] + last_val["skipped"] != val_size:
        raise RuntimeError(f"validation counted {last_val['count']} images (+{last_val['skipped']} unreadable), "
                           f"expected {val_size}")
    bad_val = last_val.pop("skipped_images")
    for path in bad_val:
        _say(env, f"left out unreadable validation image {path}")
        logger.log({"event": "bad_image", "split": "val", "epoch": epoch, "path": path})
    is_best = last_val["top1"] > progress.best_top1
    progress = TrainProgress(epoch + 1, 0, max(progress.best_top1, last_val["top1"]))
    img_s = train["img_per_s"]
    logger.log({"event": "epoch", "epoch": epoch, "lr": lrs, "train": train, "val": last_val,
                "best_top1": progress.best_top1, "img_per_s": img_s, "skipped": skipped})
    logger.scalars({"train/loss": train["loss"], "train/top1": train["top1"], "train/top5": train["top5"],
                    "val/loss": last_val["loss"], "val/top1": last_val["top1"], "val/top5": last_val["top5"],
                    "train/img_per_s": img_s, **{f"lr/{k}": v for k, v in lrs.items()}}, epoch + 1)
    save(progress, last_val, best=is_best)
    trained = (f"train loss {train['loss']:.4f} top-1 {train['top1']:.2f}" if train["images"]
               else "no training step in this invocation")
    _say(env, f"epoch {epoch + 1}/{args.epochs} lr {lrs.get('other', 0.0):.3g} | {trained} | val top-1 "
              f"{last_val['top1']:.2f} top-5 {last_val['top5']:.2f} (best {progress.best_top1:.2f}) | "
              f"{img_s:.0f} img/s {train['time_s']:.0f}s{_skipped_note(skipped, last_val['skipped'])}")
    return progress, last_val, False


def _skipped_note(skipped: Dict[str, int], val_skipped: int) -> str:
    parts = [f"{skipped['bad_images']} unreadable train image(s)" if skipped["bad_images"] else "",
             f"{val_skipped} unreadable val image(s)" if val_skipped else "",
             f"{skipped['nonfinite_batches']} non-finite-loss batch(es)" if skipped["nonfinite_batches"] else "",
             f"{skipped['short_batches']} batch(es) left with < 2 readable images" if skipped["short_batches"] else ""]
    parts = [p for p in parts if p]
    return f" | skipped {', '.join(parts)}" if parts else ""
