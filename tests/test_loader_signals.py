"""Loader workers survive the SIGTERM / SIGINT a scheduler or a terminal sends to the whole process
group (the main process saves and stops), whatever threads they already had."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
from torch.utils.data import DataLoader, Dataset

from n2uq.data import _loader_kwargs, _worker_signals


class _Pids(Dataset):
    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(0.002)
        return torch.tensor(os.getpid())


def _init_after_a_thread(worker_id: int) -> None:
    """As in a real worker, a thread exists before the init function runs (PyTorch starts some)."""
    threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
    _worker_signals(worker_id)


def test_a_worker_survives_sigterm_and_sigint_from_outside():
    kwargs = {**_loader_kwargs(1, False), "worker_init_fn": _init_after_a_thread}
    loader = DataLoader(_Pids(), batch_size=4, **kwargs)
    batches = iter(loader)
    worker = int(next(batches)[0])
    for sig in (signal.SIGTERM, signal.SIGINT):
        os.kill(worker, sig)  # sent by someone else than the main process, as a group signal is
        time.sleep(0.3)
        for _ in range(20):
            assert int(next(batches)[0]) == worker
    del batches, loader  # the main process still stops its workers
