"""When a training invocation stops: signals (SIGTERM/SIGINT), step and epoch budgets.

Schedulers send SIGTERM (and users Ctrl-C) before killing a job; :class:`RunControl` turns the
first one into a request that the engine honours at the next step boundary by saving a
mid-epoch checkpoint and returning. A second SIGINT raises ``KeyboardInterrupt`` as usual. Under
torchrun every rank learns of a request on any rank (one all-reduce per step), so all ranks stop
at the same step.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

from n2uq.distributed import all_reduce_sum, is_distributed

__all__ = ["RunControl"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunControl:
    """Step/epoch budgets of one invocation plus signal-requested stops (a context manager)."""

    def __init__(self, steps_per_run: int = 0, epochs_per_run: int = 0, device: Optional[torch.device] = None):
        self.steps_per_run, self.epochs_per_run = steps_per_run, epochs_per_run
        self.steps, self.epochs = 0, 0
        self.signal_name: Optional[str] = None
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
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

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
