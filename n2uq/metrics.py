"""Accuracy counting and run logs: a JSON-lines metrics file and TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["topk_correct", "MetricsLogger", "read_metrics"]


def topk_correct(logits: Tensor, target: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """Number of samples whose label is among the top-k logits, for each k (float64 tensor).

    ``k`` larger than the number of classes counts every sample.
    """
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return torch.stack([hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]).to(torch.float64)


class MetricsLogger:
    """Appends one JSON object per line to ``<run_dir>/metrics.jsonl`` and mirrors numbers to
    TensorBoard (``<run_dir>/tb``). A no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True, purge_step: Optional[int] = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        _end_with_newline(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run logs again the steps after its checkpoint: TensorBoard drops the
                # killed run's events from purge_step on, so no step appears twice
                self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def log(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` (plus a wall-clock ``time``) as one JSON line, in one ``write`` call.

        A run resumed after a kill may log part of an epoch again; readers take the last record.
        """
        if not self.enabled:
            return
        line = json.dumps({**record, "time": round(time.time(), 3)}, sort_keys=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """TensorBoard scalars, e.g. ``{'train/loss': 0.3, 'lr/alpha': 1e-4}`` at global ``step``."""
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _end_with_newline(path: str) -> None:
    """Terminate a last line torn by a crash or a full disk, so the next record starts a line."""
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def read_metrics(path: str, event: Optional[str] = None) -> list:
    """Records of a metrics file (optionally only those with ``event == event``).

    Lines that are not JSON objects (torn by a crash or a full disk) are left out.
    """
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec: Dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and (event is None or rec.get("event") == event):
                out.append(rec)
    return out
