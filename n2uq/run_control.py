"""When a training invocation stops: signals (SIGTERM/SIGINT), step and epoch budgets.

Schedulers send SIGTERM (and users Ctrl-C) before killing a job; :class:`RunControl` turns the
first one into a request that the engine honours at the next step boundary by saving a
mid-epoch checkpoint and returning. A second SIGINT, at least ``REPEAT_WINDOW_S`` after the
first, raises ``KeyboardInterrupt`` as usual (under torchrun one Ctrl-C reaches each rank twice:
from the terminal and forwarded by torchrun). Under torchrun every rank learns of a request on
any rank (one all-reduce per step), so all ranks stop at the same step.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional

import torch

from n2uq.distributed import all_reduce_sum, is_distributed

__all__ = ["RunControl", "REPEAT_WINDOW_S"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0


class RunControl:
    """Step/epoch budgets of one invocation plus signal-requested stops (a context manager)."""

    def __init__(self, steps_per_run: int = 0, epochs_per_run: int = 0, device: Optional[torch.device] = None):
        self.steps_per_run, self.epochs_per_run = steps_per_run, epochs_per_run
        self.steps, self.epochs = 0, 0
        self.signal_name: Optional[str] = None
        self._first_at = 0.0
        self.device = device or torch.device("cpu")
        self._previous = {}

    def __enter__(self) -> RunControl:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal_name is not None and signum == signal.SIGINT and now - self._first_at >= REPEAT_WINDOW_S:
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, now

    def _agreed(self, local: bool) -> bool:
        if not is_distributed():
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        return bool(all_reduce_sum(flag).item() > 0)

    def step_done(self) -> bool:
        """Count one optimizer step; True when this invocation should stop now (all ranks agree)."""
        self.steps += 1
        budget = bool(self.steps_per_run) and self.steps >= self.steps_per_run
        return self._agreed(budget or self.signal_name is not None)

    def epoch_done(self) -> None:
        self.epochs += 1

    def stop_before_epoch(self) -> bool:
        """True when no further epoch should start (budget spent or a signal arrived)."""
        epochs = bool(self.epochs_per_run) and self.epochs >= self.epochs_per_run
        steps = bool(self.steps_per_run) and self.steps >= self.steps_per_run
        return self._agreed(epochs or steps or self.signal_name is not None)

    def reason(self) -> str:
        return f"{self.signal_name} received" if self.signal_name else "budget of this invocation spent"
