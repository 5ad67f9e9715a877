"""``resnet/train.py`` with faults injected from the environment, for the subprocess tests of
``test_reliability.py`` and ``test_reliability_kill.py``::

    python -m tests.instrumented_train TRAIN-ARGS

* ``N2UQ_TEST_NAN=RANK:CALL[,CALL]`` the loss of rank RANK is NaN at those calls (1-based);
* ``N2UQ_TEST_PHASES=FILE`` each step, save and evaluation appends its name to FILE;
* ``N2UQ_TEST_PAUSE_AT=PHASE:N`` the N-th announcement of PHASE waits (up to 60 s) for ``FILE.go``,
  half-way through its work (a save has written half of its temp file), so a signal lands there.
"""

from __future__ import annotations

import io
import os
import sys
import time

import torch

from n2uq import loop, trainer
from n2uq.cli import run_main
from resnet import train as resnet_train


def _child() -> None:
    rank = int(os.environ.get("RANK", "0"))
    nan = os.environ.get("N2UQ_TEST_NAN")
    if nan:
        nan_rank, calls = nan.split(":")
        if int(nan_rank) == rank:
            real, count, at = loop.label_smooth_ce, [0], {int(c) for c in calls.split(",")}

            def nan_loss(*args, **kwargs):
                count[0] += 1
                value = real(*args, **kwargs)
                return value * float("nan") if count[0] in at else value

            loop.label_smooth_ce = nan_loss
    if os.environ.get("N2UQ_TEST_PHASES"):
        _announce_phases(os.environ["N2UQ_TEST_PHASES"], os.environ.get("N2UQ_TEST_PAUSE_AT", ""))
    run_main(resnet_train.main, sys.argv[1:])


def _announce_phases(path: str, pause_at: str) -> None:
    """Steps, saves and evaluations append their name to ``path``; one of them may pause (see above)."""
    seen: dict = {}
    pause_phase, _, pause_n = pause_at.partition(":")

    def announce(phase: str) -> None:
        seen[phase] = seen.get(phase, 0) + 1
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{phase}\n")
        if phase == pause_phase and seen[phase] == int(pause_n):
            deadline = time.time() + 60
            while not os.path.exists(path + ".go") and time.time() < deadline:
                time.sleep(0.02)

    real_loss, real_eval, real_save = loop.label_smooth_ce, trainer.evaluate, torch.save

    def loss(*args, **kwargs):
        value = real_loss(*args, **kwargs)
        announce("step")  # forward done, backward and optimizer step to come
        return value

    def evaluate(model, loader, *args, **kwargs):
        class Announcing:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for i, batch in enumerate(loader):
                    yield batch
                    if i == 0:
                        announce("eval")  # one batch evaluated, the rest to come

        return real_eval(model, Announcing(), *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        announce("save")  # half of the temp file written
        f.write(data[len(data) // 2:])

    loop.label_smooth_ce, trainer.evaluate, torch.save = loss, evaluate, save


if __name__ == "__main__":
    _child()
