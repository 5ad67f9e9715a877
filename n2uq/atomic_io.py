"""Atomic file writing: a checkpoint file is at every instant either the old or the new complete file.

:func:`atomic_save` writes a temporary file in the target's directory, flushes and fsyncs it,
renames it over the target (``os.replace``, atomic on POSIX and Windows) and fsyncs the folder. A
kill during a save leaves only a ``<name>.<random>.tmp`` file, which :func:`remove_stale_temps`
deletes when the next run starts. A failed write (no space left, quota, I/O error) removes its
temporary file, keeps the previous file and raises :class:`CheckpointSaveError`.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, List, Optional

import torch

__all__ = ["CheckpointSaveError", "atomic_path", "atomic_save", "remove_stale_temps"]


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the previous one is kept)."""


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


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary name beside ``path`` for a writer that takes a file name (an exporter): renamed over
    ``path`` when the block ends, removed if it raises, so ``path`` is never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


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


def remove_stale_temps(folder: str, names: Iterable[str]) -> List[str]:
    """Delete the ``<name>.*.tmp`` files that a killed :func:`atomic_save` of ``folder/<name>`` left.

    Call it before the first save into ``folder`` (on one process); returns the removed paths.
    """
    removed = []
    for name in names:
        for tmp in glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".*.tmp")):
            try:
                os.unlink(tmp)
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed
