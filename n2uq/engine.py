"""The training engine shared by ``resnet/train.py`` and ``mobilenetv2/train.py`` (SPEC §6).

``fit(build_model, args)``: torchrun/DDP or a single process, the paper's recipe (three Adam
groups, LambdaLR stepped at the start of every epoch, KD from a frozen teacher or label-smoothed
CE without one), full-precision initialisation with a report, exact resume, AMP, logging.
``evaluate(model, loader, device)`` is the validation used here and by ``scripts/evaluate.py``.
"""

from __future__ import annotations

import json
import os
import random
import time
from argparse import Namespace
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from n2uq import data as D
from n2uq.checkpoint import load_state_dict_strict
from n2uq.distributed import DistEnv, all_reduce_sum, barrier, cleanup, init_distributed, is_distributed
from n2uq.losses import kd_loss, label_smooth_ce
from n2uq.metrics import MetricsLogger, topk_correct
from n2uq.pretrained import load_pretrained
from n2uq.recipe import RESNET_ALPHA_PATTERNS, build_optimizer, build_scheduler, scheduler_step
from n2uq.run_control import RunControl
from n2uq.teacher import build_teacher
from n2uq.train_state import (
    BEST_NAME,
    CHECKPOINT_NAME,
    TrainProgress,
    atomic_save,
    build_checkpoint,
    read_training_checkpoint,
    restore_rng,
)

__all__ = ["fit", "train_one_epoch", "evaluate", "autocast", "configure_threads", "default_workers"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
             progress: bool = False, desc: str = "val") -> Dict[str, float]:
    """Top-1/top-5 (percent), mean CE loss and image count over ``loader``, summed over all ranks.

    Use a loader whose sampler gives each image to exactly one rank (``n2uq.data.ShardSampler``)
    and every image is counted once. Leaves the model in eval mode.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, count
    for images, target in _progress_bar(loader, len(loader), desc, progress):
        images, target = _to_device(images, target, device, channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        sums[0] += nn.functional.cross_entropy(logits, target, reduction="sum").double()
        sums[1:3] += topk_correct(logits, target, (1, 5)).to(device)
        sums[3] += target.numel()
    all_reduce_sum(sums)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss / count,
            "count": int(sums[3].item())}


def train_one_epoch(model: nn.Module, teacher: Optional[nn.Module], loader, optimizer, scaler,
                    env: DistEnv, args: Namespace, epoch: int, logger: Optional[MetricsLogger] = None,
                    start_step: int = 0, after_step: Optional[Callable[[int], bool]] = None) -> Dict[str, Any]:
    """One pass over this rank's shard; returns loss and top-1/top-5 (percent) over all ranks.

    The loss is :func:`~n2uq.losses.kd_loss` against ``teacher`` when there is one, else
    label-smoothed cross-entropy. ``start_step`` numbers the first batch (resume inside an epoch).
    ``after_step(steps done in this epoch)`` runs after every optimizer step; when it returns True
    the epoch ends there (``stopped`` in the result).
    """
    device = env.device
    model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss·n, top-1, top-5, n
    steps = len(loader)
    bar = _progress_bar(loader, steps, f"epoch {epoch + 1}/{args.epochs}", env.is_main and not args.no_progress)
    t0 = time.time()
    stopped = False
    for step, (images, target) in enumerate(bar, start=start_step):
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
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

        n = target.numel()
        with torch.no_grad():
            sums[0] += loss.detach().double() * n
            sums[1:3] += topk_correct(logits.detach().float(), target, (1, 5)).to(device)
            sums[3] += n
        done = step + 1 - start_step
        if env.is_main and (done % 10 == 0 or done == steps):
            seen = sums[3].item() * env.world_size
            bar.set_postfix(loss=f"{sums[0].item() / sums[3].item():.3f}",
                            top1=f"{100 * sums[1].item() / sums[3].item():.1f}",
                            img_s=f"{seen / (time.time() - t0):.0f}", refresh=False)
        if logger is not None and (step + 1) % args.log_every == 0:
            global_step = epoch * (steps + start_step) + step + 1
            logger.scalars({"train/loss_step": loss.item()}, global_step)
        if after_step is not None and after_step(step + 1):
            stopped = True
            break
    elapsed = time.time() - t0
    all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
            "images": int(sums[3].item()), "img_per_s": sums[3].item() / max(elapsed, 1e-9), "time_s": elapsed,
            "stopped": stopped}


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
        raise D.DataError(f"{args.data}: train/ and val/ have different class folders "
                          f"({len(train_ds.classes)} vs {len(val_ds.classes)})")
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
    resume_path = _resolve_resume(args.resume, run_dir)
    if resume_path is None:
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
    if resume_path is not None:
        ckpt = read_training_checkpoint(resume_path)
        load_state_dict_strict(model, ckpt["state_dict"], source=resume_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("rng"):
            restore_rng(ckpt["rng"])
        progress = TrainProgress(int(ckpt["next_epoch"]), int(ckpt["step_in_epoch"]),
                                 float(ckpt.get("best_top1_acc", 0.0)))
        _say(env, f"resumed from {resume_path}: next epoch {progress.next_epoch + 1}, "
                  f"best top-1 {progress.best_top1:.2f}")

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
                "next_epoch": progress.next_epoch, "args": _plain_args(args)})

    def save(state: TrainProgress, val: Optional[Dict[str, float]] = None, best: bool = False) -> None:
        if env.is_main:
            ckpt = build_checkpoint(model, optimizer, scheduler, scaler, state, args=_plain_args(args),
                                    config=config, classes=train_ds.classes, val=val)
            atomic_save(ckpt, os.path.join(run_dir, CHECKPOINT_NAME))
            if best:
                atomic_save(ckpt, os.path.join(run_dir, BEST_NAME))
        barrier()

    last_val: Dict[str, float] = {}
    with RunControl(args.steps_per_run, args.epochs_per_run, device) as control:
        for epoch in range(progress.next_epoch, args.epochs):
            if control.stop_before_epoch():
                _say(env, f"stopping before epoch {epoch + 1}: {control.reason()}; run again to resume")
                break
            progress, last_val, stopped = _run_epoch(
                env, args, epoch, progress, train_model, model, teacher, train_loader, val_loader, len(val_ds),
                optimizer, scheduler, scaler, logger, control, save, per_rank_batch)
            if stopped:
                _say(env, f"stopped in epoch {epoch + 1} after step {progress.step_in_epoch}: {control.reason()}; "
                          f"checkpoint saved, run again to resume")
                break
            control.epoch_done()
    logger.close()
    if progress.next_epoch >= args.epochs:
        _say(env, f"finished {args.epochs} epochs: best val top-1 {progress.best_top1:.2f} "
                  f"({os.path.join(run_dir, BEST_NAME)})")
    return {"run_dir": run_dir, "best_top1": progress.best_top1, "last_val": last_val,
            "next_epoch": progress.next_epoch, "step_in_epoch": progress.step_in_epoch}


def _run_epoch(env, args, epoch, progress, train_model, model, teacher, train_loader, val_loader, val_size,
               optimizer, scheduler, scaler, logger, control, save, per_rank_batch):
    """Train (from ``progress.step_in_epoch``), validate, checkpoint and log one epoch.

    Returns ``(progress, val, stopped)``; when a stop is requested inside the epoch, a mid-epoch
    checkpoint is written and validation is skipped. ``--save_every_steps`` writes one too.
    """
    device = env.device
    if progress.step_in_epoch == 0:
        scheduler_step(scheduler)  # at the start of the epoch, as the reference
    train_loader.sampler.set_epoch(epoch, progress.step_in_epoch, per_rank_batch)
    steps_in_epoch = progress.step_in_epoch + len(train_loader)
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
    best_so_far = progress.best_top1
    last_done = [progress.step_in_epoch]

    def after_step(done: int) -> bool:
        last_done[0] = done
        stop = control.step_done() and done < steps_in_epoch  # the last step finishes the epoch first
        if stop or (args.save_every_steps and done % args.save_every_steps == 0 and done < steps_in_epoch):
            save(TrainProgress(epoch, done, best_so_far))
        return stop

    train = train_one_epoch(train_model, teacher, train_loader, optimizer, scaler, env, args, epoch, logger,
                            start_step=progress.step_in_epoch, after_step=after_step)
    if train["stopped"]:
        return TrainProgress(epoch, last_done[0], best_so_far), {}, True
    _sync_buffers(model)
    last_val = evaluate(model, val_loader, device, args.amp, args.channels_last,
                        progress=env.is_main and not args.no_progress)
    if last_val["count"] != val_size:
        raise RuntimeError(f"validation counted {last_val['count']} images, expected {val_size}")
    is_best = last_val["top1"] > progress.best_top1
    progress = TrainProgress(epoch + 1, 0, max(progress.best_top1, last_val["top1"]))
    save(progress, last_val, best=is_best)
    img_s = train["img_per_s"]
    _say(env, f"epoch {epoch + 1}/{args.epochs} lr {lrs.get('other', 0.0):.3g} | train loss "
              f"{train['loss']:.4f} top-1 {train['top1']:.2f} | val top-1 {last_val['top1']:.2f} top-5 "
              f"{last_val['top5']:.2f} (best {progress.best_top1:.2f}) | {img_s:.0f} img/s "
              f"{train['time_s']:.0f}s")
    logger.log({"event": "epoch", "epoch": epoch, "lr": lrs, "train": train, "val": last_val,
                "best_top1": progress.best_top1, "img_per_s": img_s})
    logger.scalars({"train/loss": train["loss"], "train/top1": train["top1"], "train/top5": train["top5"],
                    "val/loss": last_val["loss"], "val/top1": last_val["top1"], "val/top5": last_val["top5"],
                    "train/img_per_s": img_s, **{f"lr/{k}": v for k, v in lrs.items()}}, epoch + 1)
    return progress, last_val, False
