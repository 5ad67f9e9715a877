"""Loader workers survive the SIGTERM / SIGINT a scheduler or a terminal sends to the whole process
group (the main process saves and stops), whatever threads they have, and still stop when their
own process ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from n2uq.data import SignalSafeLoader, _loader_kwargs, _worker_signals

ROOT = Path(__file__).resolve().parents[1]


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


def test_a_worker_survives_sigterm_and_sigint_from_another_process():
    kwargs = {**_loader_kwargs(1, False), "worker_init_fn": _init_after_a_thread}
    loader = SignalSafeLoader(_Pids(), batch_size=4, **kwargs)
    batches = iter(loader)
    worker = int(next(batches)[0])
    for name in ("TERM", "INT"):
        subprocess.run(["kill", "-s", name, str(worker)], check=True)  # not from the main process
        time.sleep(0.3)
        for _ in range(20):
            assert int(next(batches)[0]) == worker
    del batches, loader


def test_a_process_that_exits_with_live_workers_ends():
    """Interpreter exit terminates the workers (SIGTERM from their main process): they must obey."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_loader_signals import _Pids
        from n2uq.data import SignalSafeLoader, _loader_kwargs
        LOADER = SignalSafeLoader(_Pids(), batch_size=4, **_loader_kwargs(1, False))
        BATCHES = iter(LOADER)
        next(BATCHES)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
