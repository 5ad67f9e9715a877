"""Training checkpoints: the reference's layout plus everything an exact resume needs (SPEC §6).

Directory: ``<save>/<arch>_<b>bit_quantize_downsample_<True|False>/`` holding ``checkpoint.pth.tar``
(every epoch) and ``model_best.pth.tar`` (on a new best top-1). Contents::

    epoch            last finished epoch, 0-based (the reference's meaning; resume starts at +1)
    state_dict       model weights with the reference's ``module.`` prefix
    best_top1_acc    best validation top-1 so far (percent)
    optimizer        Adam state (the reference saved it but never restored it; we restore it)
    scheduler, scaler, rng, args, config, classes, val_top1, val_top5
    next_epoch, step_in_epoch   where training continues (step_in_epoch > 0: inside an epoch)
    skipped          unreadable images / left-out batches so far in the epoch in progress
    world_size, train_images    the data layout a mid-epoch position refers to

Files are written atomically: a temporary file in the same directory is written, flushed and
fsynced, then renamed over the target (``os.replace``, atomic on POSIX and Windows) and the folder
is fsynced. ``checkpoint.pth.tar`` is therefore at every instant either the previous complete file
or the new complete file; a kill during a save leaves only a ``checkpoint.pth.tar.*.tmp`` file,
which :func:`remove_stale_temps` deletes when the next run starts. A failed write (no space left,
quota, I/O error) removes its temporary file, keeps the previous checkpoint and raises
:class:`CheckpointSaveError`.
"""

from __future__ import annotations

import errno
import glob
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from n2uq.checkpoint import CheckpointError, read_checkpoint, strip_prefixes

__all__ = ["CHECKPOINT_NAME", "BEST_NAME", "CheckpointSaveError", "TrainProgress", "run_name", "atomic_save",
           "remove_stale_temps", "capture_rng", "restore_rng", "model_state_for_save", "build_checkpoint",
           "read_training_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"


SKIP_COUNTERS = ("bad_images", "nonfinite_batches", "short_batches")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the previous one is kept)."""


@dataclass
class TrainProgress:
    """Loop position: ``next_epoch`` to run and ``step_in_epoch`` batches of it already done.

    ``skipped`` counts, for the epoch in progress, unreadable images and batches left out
    (``--skip_bad_images``, ``--skip_nonfinite``), so a resumed epoch reports the whole epoch.
    """

    next_epoch: int = 0
    step_in_epoch: int = 0
    best_top1: float = 0.0
    skipped: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_COUNTERS, 0))


def run_name(arch: str, n_bit: int, quantize_downsample: bool) -> str:
    """The reference's run folder name, e.g. ``resnet18_2bit_quantize_downsample_False``."""
    return f"{arch}_{n_bit}bit_quantize_downsample_{bool(quantize_downsample)}"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then ``os.replace`` (and fsync the dir).

    On any failure the temp file is removed, ``path`` is left as it was, and
    :class:`CheckpointSaveError` says why and what to do.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as exc:
        raise CheckpointSaveError(_save_failure(path, directory, exc)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(directory)


def _save_failure(path: str, directory: str, exc: BaseException) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    # torch's zip writer reports a failed write as a RuntimeError whose context is the OSError
    os_error: Optional[BaseException] = exc
    while os_error is not None and not (isinstance(os_error, OSError) and os_error.errno):
        os_error = os_error.__context__
    if isinstance(os_error, OSError) and os_error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device"
    elif isinstance(os_error, OSError):
        reason = os_error.strerror or str(os_error)
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if free is not None and free < 1 << 20:
            reason += ", the device is full"
    where = f"{directory} ({free / 2**20:.1f} MiB free)" if free is not None else directory
    kept = "the previous checkpoint there is kept" if os.path.exists(path) else "nothing was written"
    return (f"cannot write checkpoint {path}: {reason}; {kept}. Free space on {where} or pass another --save "
            f"folder, then run again to resume")


def _fsync_dir(directory: str) -> None:
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


def remove_stale_temps(run_dir: str) -> List[str]:
    """Delete ``<checkpoint name>.*.tmp`` files that a killed :func:`atomic_save` left in ``run_dir``.

    Call it before this run's first save (on one process); returns the removed paths.
    """
    removed = []
    for name in (CHECKPOINT_NAME, BEST_NAME):
        for tmp in glob.glob(os.path.join(glob.escape(run_dir), glob.escape(name) + ".*.tmp")):
            try:
                os.unlink(tmp)
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


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
                     classes=None, val: Optional[Mapping[str, float]] = None,
                     extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint dictionary described in the module docstring (plus the entries of ``extra``)."""
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
        "skipped": dict(progress.skipped),
        **dict(extra or {}),
    }
    if val:
        ckpt.update({f"val_{k}": float(v) for k, v in val.items() if k in ("top1", "top5")})
    return ckpt


def read_training_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint for resuming (safe load); ``next_epoch`` is filled in for reference files."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'state_dict' entry)")
    ckpt.setdefault("next_epoch", int(ckpt.get("epoch", -1)) + 1)
    ckpt.setdefault("step_in_epoch", 0)
    ckpt["skipped"] = {k: int((ckpt.get("skipped") or {}).get(k, 0)) for k in SKIP_COUNTERS}
    return ckpt
