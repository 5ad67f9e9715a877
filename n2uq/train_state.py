"""Training checkpoints: the reference's layout plus everything an exact resume needs (SPEC §6).

Directory: ``<save>/<arch>_<b>bit_quantize_downsample_<True|False>/`` holding ``checkpoint.pth.tar``
(every epoch) and ``model_best.pth.tar`` (on a new best top-1). Contents::

    epoch            last finished epoch, 0-based (the reference's meaning; resume starts at +1)
    state_dict       model weights with the reference's ``module.`` prefix
    best_top1_acc    best validation top-1 so far (percent)
    optimizer        Adam state (the reference saved it but never restored it; we restore it)
    scheduler, scaler, rng, args, config, classes, val_top1, val_top5
    next_epoch, step_in_epoch   where training continues (step_in_epoch > 0: inside an epoch)

Files are written atomically: a temporary file in the same directory is written, flushed and
fsynced, then renamed over the target, so the previous checkpoint stays intact until the new one
is complete, and a crash never leaves a half-written ``checkpoint.pth.tar``.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from n2uq.checkpoint import read_checkpoint, strip_prefixes

__all__ = ["CHECKPOINT_NAME", "BEST_NAME", "TrainProgress", "run_name", "atomic_save", "capture_rng",
           "restore_rng", "model_state_for_save", "build_checkpoint", "read_training_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"


@dataclass
class TrainProgress:
    """Loop position: ``next_epoch`` to run and ``step_in_epoch`` batches of it already done."""

    next_epoch: int = 0
    step_in_epoch: int = 0
    best_top1: float = 0.0


def run_name(arch: str, n_bit: int, quantize_downsample: bool) -> str:
    """The reference's run folder name, e.g. ``resnet18_2bit_quantize_downsample_False``."""
    return f"{arch}_{n_bit}bit_quantize_downsample_{bool(quantize_downsample)}"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then ``os.replace`` (and fsync the dir)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


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


def build_checkpoint(model: nn.Module, optimizer, scheduler, scaler, progress: TrainProgress, *,
                     args: Optional[Mapping[str, Any]] = None, config: Optional[Mapping[str, Any]] = None,
                     classes=None, val: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """The checkpoint dictionary described in the module docstring."""
    ckpt: Dict[str, Any] = {
        "epoch": progress.next_epoch - 1,
        "state_dict": model_state_for_save(model),
        "best_top1_acc": progress.best_top1,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng(),
        "next_epoch": progress.next_epoch,
        "step_in_epoch": progress.step_in_epoch,
        "args": dict(args or {}),
        "config": dict(config or {}),
        "classes": list(classes or []),
    }
    if val:
        ckpt.update({f"val_{k}": float(v) for k, v in val.items() if k in ("top1", "top5")})
    return ckpt


def read_training_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint for resuming (safe load); ``next_epoch`` is filled in for reference files."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint (no 'state_dict' entry)")
    ckpt.setdefault("next_epoch", int(ckpt.get("epoch", -1)) + 1)
    ckpt.setdefault("step_in_epoch", 0)
    return ckpt
