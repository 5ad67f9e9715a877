"""The training engine shared by ``resnet/train.py`` and ``mobilenetv2/train.py``.

``fit(build_model, cfg)``: torchrun/DDP or a single process, the paper's recipe (three Adam
groups, LambdaLR stepped at the start of every epoch, KD from a frozen teacher or label-smoothed
CE without one), full-precision initialisation with a report, exact resume, AMP, logging. ``cfg``
is the run's :class:`~n2uq.run_config.TrainConfig`, parsed once from the flags by the script.
``evaluate(model, loader, device)`` is the validation used here and by ``scripts/evaluate.py``.

This module sets a run up; the parts live beside it: :mod:`n2uq.loop` (one pass over the data),
:mod:`n2uq.trainer` (the epoch loop, checkpoints and faults), :mod:`n2uq.resume` (reading a
checkpoint back), :mod:`n2uq.train_state` (what a checkpoint holds), :mod:`n2uq.atomic_io`
(writing it), :mod:`n2uq.run_control` (signals and budgets), :mod:`n2uq.distributed` (collectives).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from n2uq import data as D
from n2uq.atomic_io import remove_stale_temps
from n2uq.distributed import DistEnv, cleanup, init_distributed
from n2uq.loop import LoopContext, NonFiniteError, autocast, evaluate, say, train_one_epoch
from n2uq.metrics import MetricsLogger
from n2uq.pretrained import load_pretrained
from n2uq.recipe import RESNET_ALPHA_PATTERNS, build_optimizer, build_scheduler
from n2uq.resume import carry_best, check_resume, read_resume, resolve_resume, restore_training, resumed_flags
from n2uq.run_config import DataConfig, TrainConfig, check_same_classes
from n2uq.run_control import RunControl
from n2uq.teacher import build_teacher
from n2uq.train_state import BEST_NAME, CHECKPOINT_FILES, RunRecord, TrainingParts, TrainProgress
from n2uq.trainer import TrainData, Trainer, TrainerState

__all__ = ["NonFiniteError", "fit", "train_one_epoch", "evaluate", "autocast", "configure_threads",
           "default_workers"]


def configure_threads(threads: int, env: DistEnv) -> None:
    """CPU threads per process: ``threads``, or cores / processes on this machine when 0."""
    if threads == 0 and env.device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // env.local_world_size)
    if threads > 0:
        torch.set_num_threads(threads)


def default_workers(env: DistEnv) -> int:
    """Loader workers per process when ``--workers`` is not given: cores per process, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) // env.local_world_size))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def fit(build_model: Callable[[int], nn.Module], cfg: TrainConfig,
        alpha_patterns: Sequence[str] = RESNET_ALPHA_PATTERNS, run_name: str = "run",
        config: Optional[Dict[str, Any]] = None, reference_run_dir: Optional[str] = None) -> Dict[str, Any]:
    """Train ``build_model(num_classes)`` as ``cfg`` says (the flags of :func:`n2uq.cli.build_train_parser`).

    ``run_name`` is the folder under ``--save``; ``config`` (arch, n_bit, ...) is stored in the
    checkpoints. ``reference_run_dir`` is the folder under ``--save`` where the reference's script
    writes this model's checkpoints when that is not ``run_name`` (MobileNetV2: ``"."``, ``--save``
    itself): ``--resume auto`` also looks there, and a run found there goes on writing there.
    Returns ``{'run_dir', 'best_top1', 'last_val', 'next_epoch', 'step_in_epoch'}``.
    """
    if not isinstance(cfg, TrainConfig):  # e.g. an argparse namespace, as fit took before
        raise TypeError(f"fit takes an n2uq.run_config.TrainConfig, not {type(cfg).__name__}; build it with "
                        f"n2uq.cli.parse_train_config or TrainConfig.from_flags(vars(namespace))")
    env = init_distributed(cfg.run.device)
    save = cfg.run.save
    spec = RunSpec(run_name, dict(config or {}), tuple(alpha_patterns), os.path.join(save, run_name),
                   os.path.normpath(os.path.join(save, reference_run_dir)) if reference_run_dir else None)
    try:
        return _fit(env, build_model, cfg, spec)
    finally:
        cleanup()


@dataclass(frozen=True)
class RunSpec:
    """What the calling script says about its run: the folder name, the model's configuration, the
    alpha-group rules, the run folder and the reference script's folder for this model (if other)."""

    name: str
    config: Dict[str, Any]
    alpha_patterns: Tuple[str, ...]
    run_dir: str
    reference_dir: Optional[str] = None


def _find_resume(resume: str, spec: RunSpec, env: DistEnv) -> Tuple[Optional[str], str]:
    """The checkpoint to resume (or ``None``) and the run folder: ``spec.run_dir``, or the
    reference's folder when ``--resume auto`` found the run there."""
    resume_path = resolve_resume(resume, spec.run_dir, [spec.reference_dir] if spec.reference_dir else [])
    if resume == "auto" and resume_path is not None and os.path.dirname(resume_path) != spec.run_dir:
        run_dir = os.path.dirname(resume_path)
        say(env, f"no checkpoint in {spec.run_dir}; the run's checkpoint is in {run_dir}, where the reference's "
                 f"script writes it, and the run goes on there")
        return resume_path, run_dir
    return resume_path, spec.run_dir


def _datasets(data: DataConfig) -> Tuple[D.CheckedImageFolder, D.CheckedImageFolder]:
    """train/ and val/ with the recipe's transforms; both must have the same classes and a full batch."""
    train_ds = D.image_folder(data.data, "train", D.train_transform(data.image_size, data.min_crop_scale))
    val_ds = D.image_folder(data.data, "val", D.val_transform(data.image_size, data.val_resize))
    check_same_classes(data.data, train_ds.classes, val_ds.classes)
    if len(train_ds) < data.batch_size:
        raise D.DataError(f"{data.data}/train has {len(train_ds)} images, fewer than one batch of "
                          f"{data.batch_size}; lower --batch_size")
    return train_ds, val_ds


def _loaders(train_ds, val_ds, data: DataConfig, seed: int, env: DistEnv) -> TrainData:
    workers = default_workers(env) if data.workers is None else data.workers
    pin = env.device.type == "cuda"
    per_rank_batch = data.batch_size // env.world_size
    train_loader = D.build_train_loader(train_ds, per_rank_batch, env.rank, env.world_size, seed, workers, pin)
    val_loader = D.build_val_loader(val_ds, per_rank_batch, env.rank, env.world_size, workers, pin)
    return TrainData(train_loader, val_loader, len(val_ds), per_rank_batch)


def _initialise(model: nn.Module, cfg: TrainConfig, config: Dict[str, Any], run_dir: str, env: DistEnv) -> None:
    """Full-precision initialisation (``--pretrained``) with its report on screen and in the run folder."""
    report = load_pretrained(model, cfg.student.pretrained, config.get("arch", ""),
                             bool(config.get("quantize_downsample", False)), cfg.student.models_dir, cfg.run.save)
    if report is None and config.get("arch") == "mobilenetv2" and not config.get("full_precision"):
        say(env, "warning: a quantized MobileNetV2 from random init does not learn: its quantized convolutions "
                 "start at weights of about 1e-3 (SPEC §2), so every LTQ code is 0 and only fc.bias gets a gradient "
                 "(the reference starts from real_mbv2.pth.tar); pass --pretrained FILE, e.g. a --full_precision run")
    if report is not None and env.is_main:
        say(env, report.summary())
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "pretrained_report.json"), "w", encoding="utf-8") as f:
            json.dump(report.as_dict(), f, indent=1)


def _training_parts(model: nn.Module, cfg: TrainConfig, alpha_patterns: Sequence[str]) -> TrainingParts:
    optim = cfg.optim
    optimizer = build_optimizer(model, optim.learning_rate, optim.weight_decay, (optim.momentum, 0.999),
                                alpha_patterns, all_ltq_a=optim.alpha_group == "all_ltq",
                                pact_alpha_decay=optim.pact_alpha_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.run.amp == "fp16" else None
    return TrainingParts(model, optimizer, build_scheduler(optimizer, optim.epochs), scaler)


def _add_teacher_and_wrappers(parts: TrainingParts, cfg: TrainConfig, env: DistEnv, num_classes: int) -> None:
    """The frozen teacher, and the module the steps run: DDP over several processes, ``--compile``."""
    teacher = build_teacher(cfg.optim.teacher, cfg.optim.teacher_weights, num_classes)
    if teacher is not None:
        teacher.to(env.device)
        if cfg.run.channels_last:
            teacher.to(memory_format=torch.channels_last)
    train_model: nn.Module = parts.model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            parts.model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.run.compile:
        train_model = torch.compile(train_model)
    parts.teacher, parts.train_model = teacher, train_model


def _fit(env: DistEnv, build_model: Callable[[int], nn.Module], cfg: TrainConfig, spec: RunSpec) -> Dict[str, Any]:
    run = cfg.run
    configure_threads(run.threads, env)
    _seed_everything(run.seed)
    device = env.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_ds, val_ds = _datasets(cfg.data)
    data = _loaders(train_ds, val_ds, cfg.data, run.seed, env)
    num_classes = len(train_ds.classes)

    model = build_model(num_classes)
    config, run_name = {**spec.config, "num_classes": num_classes}, spec.name
    resume_path, run_dir = _find_resume(run.resume, spec, env)
    record = RunRecord(cfg.flags(), config, list(train_ds.classes),
                       {"world_size": env.world_size, "train_images": len(train_ds)})
    ckpt = None
    if resume_path is not None:
        ckpt = read_resume(resume_path, run.resume == "auto")
        source = f"--resume {resume_path}" if run.resume != "auto" else f"the run's checkpoint {resume_path}"
        check_resume(ckpt, source, config, record.args, record.layout, record.classes)
        record.args = resumed_flags(record.args, ckpt)
    if env.is_main:  # after the checks: a refused run deletes and writes nothing
        for tmp in remove_stale_temps(run_dir, CHECKPOINT_FILES):
            say(env, f"removed {tmp}, left by a save that was interrupted")
    if ckpt is None:
        _initialise(model, cfg, config, run_dir, env)
    model.to(device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)

    parts = _training_parts(model, cfg, spec.alpha_patterns)
    progress, best_file = TrainProgress(), None
    if ckpt is not None:
        progress, notes = restore_training(parts, ckpt, resume_path, spec.alpha_patterns)
        if env.is_main:
            best_file, carried = carry_best(resume_path, run_dir, progress.best_top1)
            notes.extend(carried)
        at = f", step {progress.step_in_epoch}" if progress.step_in_epoch else ""
        say(env, f"resumed from {resume_path}: next epoch {progress.next_epoch + 1}{at}, "
                 f"best top-1 {progress.best_top1:.2f}", *notes)
        del ckpt
    _add_teacher_and_wrappers(parts, cfg, env, num_classes)

    purge_step = None  # the first step this run logs again (loop.py numbers step s of epoch e e·steps + s + 1)
    if resume_path is not None:
        purge_step = progress.next_epoch * len(data.train_loader) + progress.step_in_epoch + 1
    logger = MetricsLogger(run_dir, enabled=env.is_main, purge_step=purge_step)
    n_params = sum(p.numel() for p in model.parameters())
    say(env, f"{run_name}: {n_params / 1e6:.2f}M parameters, {num_classes} classes, "
             f"{len(train_ds)} train / {len(val_ds)} val images, {env.world_size} process(es) on {device.type}, "
             f"batch {cfg.data.batch_size} ({data.per_rank_batch} per process), "
             f"{'KD from ' + cfg.optim.teacher if parts.teacher is not None else 'label-smoothed CE (no teacher)'}")
    logger.log({"event": "start", "run": run_name, "world_size": env.world_size, "resume": resume_path,
                "next_epoch": progress.next_epoch, "step_in_epoch": progress.step_in_epoch, "args": record.args})
    state = TrainerState(progress, last_good=f"{resume_path} ({progress.describe()})" if resume_path else None,
                         best_file=best_file)
    try:
        with RunControl(run.steps_per_run, run.epochs_per_run, device) as control:
            last_val = Trainer(parts, data, LoopContext(env, cfg, logger), record, run_dir, control, state).run()
    finally:
        logger.close()
    progress = state.progress
    epochs = cfg.optim.epochs
    if progress.next_epoch >= epochs:
        where = state.best_file or f"no {BEST_NAME} in {run_dir}: " + (
            "the best epoch was saved by an earlier run" if progress.best_top1 > 0 else "no epoch scored above 0")
        say(env, f"finished {epochs} epochs: best val top-1 {progress.best_top1:.2f} ({where})")
    return {"run_dir": run_dir, "best_top1": progress.best_top1, "last_val": last_val,
            "next_epoch": progress.next_epoch, "step_in_epoch": progress.step_in_epoch}
