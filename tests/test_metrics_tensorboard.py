"""A run resumed after a kill logs again the steps after its checkpoint; TensorBoard must not show
them twice (``MetricsLogger(purge_step=...)``, which the engine sets on resume)."""

from __future__ import annotations

import pytest

from n2uq.metrics import MetricsLogger

pytest.importorskip("tensorboard")


def _steps(run_dir) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss_step")]


def test_a_resumed_run_replaces_the_steps_it_logs_again(tmp_path):
    killed = MetricsLogger(str(tmp_path))
    for step in range(1, 8):  # killed after step 7; its last checkpoint was at step 4
        killed.scalars({"train/loss_step": 1.0}, step)
    killed.close()
    resumed = MetricsLogger(str(tmp_path), purge_step=5)
    for step in range(5, 10):
        resumed.scalars({"train/loss_step": 2.0}, step)
    resumed.close()
    assert _steps(tmp_path) == list(range(1, 10))
