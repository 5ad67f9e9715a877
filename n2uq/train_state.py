"""What a training checkpoint holds: the reference's layout plus everything an exact resume needs.

Directory: ``<save>/<arch>_<b>bit_quantize_downsample_<True|False>/`` holding ``checkpoint.pth.tar``
(every epoch) and ``model_best.pth.tar`` (on a new best top-1). Contents::

    epoch            last finished epoch, 0-based (the reference's meaning; resume starts at +1)
    state_dict       model weights with the reference's ``module.`` prefix
    best_top1_acc    best validation top-1 so far (percent)
    optimizer        Adam state (the reference saved it but never restored it; we restore it)
    scheduler, scaler, rng, args, config, classes, val_top1, val_top5
    next_epoch, step_in_epoch   where training continues (step_in_epoch > 0: inside an epoch)
    skipped          unreadable images / left-out batches so far in the epoch in progress
    train_sums       mid-epoch only: the epoch's training loss and hits so far (TRAIN_SUMS, all ranks)
                     and its training seconds (``time_s``), so a resumed epoch reports the whole epoch
    world_size, train_images    the data layout a mid-epoch position refers to

Writing the file is :mod:`n2uq.atomic_io`'s job, reading it back for a resume :mod:`n2uq.resume`'s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from n2uq.checkpoint import strip_prefixes

__all__ = ["CHECKPOINT_NAME", "BEST_NAME", "CHECKPOINT_FILES", "SKIP_COUNTERS", "TRAIN_SUMS", "TrainProgress",
           "TrainingParts", "RunRecord", "run_name", "capture_rng", "restore_rng", "model_state_for_save",
           "build_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"
CHECKPOINT_FILES = (CHECKPOINT_NAME, BEST_NAME)

SKIP_COUNTERS = ("bad_images", "nonfinite_batches", "short_batches")
#: The running sums of an epoch's training metrics: loss times batch size, top-1 and top-5 hits, images.
TRAIN_SUMS = ("loss_sum", "top1_hits", "top5_hits", "images")


@dataclass
class TrainProgress:
    """Loop position: ``next_epoch`` to run and ``step_in_epoch`` batches of it already done.

    ``skipped`` counts, for the epoch in progress, unreadable images and batches left out
    (``--skip_bad_images``, ``--skip_nonfinite``), and ``train_sums`` (inside an epoch) holds its
    training sums so far (:data:`TRAIN_SUMS` over all ranks, and ``time_s``), so a resumed epoch
    reports the whole epoch.
    """

    next_epoch: int = 0
    step_in_epoch: int = 0
    best_top1: float = 0.0
    skipped: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_COUNTERS, 0))
    train_sums: Optional[Dict[str, float]] = None

    def describe(self) -> str:
        """``epoch 2 after step 3``, ``end of epoch 1`` or ``before epoch 1``."""
        if self.step_in_epoch:
            return f"epoch {self.next_epoch + 1} after step {self.step_in_epoch}"
        return f"end of epoch {self.next_epoch}" if self.next_epoch else "before epoch 1"


@dataclass
class TrainingParts:
    """The objects a training run steps and saves.

    ``model`` is the student as saved and evaluated; ``train_model`` the module the training steps
    run (its DistributedDataParallel or ``torch.compile`` wrapper; ``None``: ``model`` itself).
    ``teacher`` is the frozen KD teacher (``None``: label-smoothed cross-entropy).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Optional[torch.amp.GradScaler] = None
    teacher: Optional[nn.Module] = None
    train_model: Optional[nn.Module] = None

    @property
    def stepped(self) -> nn.Module:
        """The module the training steps run."""
        return self.model if self.train_model is None else self.train_model


@dataclass
class RunRecord:
    """What every checkpoint of a run says about the run besides its position.

    ``args``: the flags (plain values); ``config``: the model (arch, n_bit, ...); ``classes``: the
    class folder names; ``layout``: ``world_size`` and ``train_images``, which a mid-epoch position
    refers to.
    """

    args: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    classes: List[str] = field(default_factory=list)
    layout: Dict[str, int] = field(default_factory=dict)


def run_name(arch: str, n_bit: int, quantize_downsample: bool, method_tag: str = "n2uq") -> str:
    """The reference's run folder name, e.g. ``resnet18_2bit_quantize_downsample_False``; another
    method or an N2UQ ablation puts its tag after the architecture (``resnet18_lsq_2bit_...``)."""
    method = "" if method_tag == "n2uq" else f"{method_tag}_"
    return f"{arch}_{method}{n_bit}bit_quantize_downsample_{bool(quantize_downsample)}"


def capture_rng() -> Dict[str, Any]:
    """CPU/CUDA torch, Python and NumPy RNG states, as tensors and plain containers only."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    except ImportError:
        pass
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (entries missing from ``state`` are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def model_state_for_save(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The unwrapped model's state dict with the reference's ``module.`` prefix on every key."""
    own = strip_prefixes(model.state_dict())
    return {f"module.{k}": v.detach().cpu().clone() for k, v in own.items()}


def build_checkpoint(parts: TrainingParts, progress: TrainProgress, record: Optional[RunRecord] = None,
                     val: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """The checkpoint dictionary described in the module docstring."""
    record = record or RunRecord()
    ckpt: Dict[str, Any] = {
        "epoch": progress.next_epoch - 1,
        "state_dict": model_state_for_save(parts.model),
        "best_top1_acc": progress.best_top1,
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "rng": capture_rng(),
        "next_epoch": progress.next_epoch,
        "step_in_epoch": progress.step_in_epoch,
        "args": dict(record.args),
        "config": dict(record.config),
        "classes": list(record.classes),
        "skipped": dict(progress.skipped),
        "train_sums": dict(progress.train_sums) if progress.step_in_epoch and progress.train_sums else None,
        **dict(record.layout),
    }
    if val:
        ckpt.update({f"val_{k}": float(v) for k, v in val.items() if k in ("top1", "top5")})
    return ckpt
