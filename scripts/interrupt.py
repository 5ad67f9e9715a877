"""Ctrl-C while a script starts (importing torch alone takes a second or more): one line and exit
status 130, never a traceback from inside an import. And for the scripts that run training as child
processes (a comparison grid, the scaled-down paper recipe): Ctrl-C or SIGTERM waits for the child to
save its checkpoint instead of killing it (:func:`run_child`).

Standard library only, so that a script can install it before its heavy imports. From then on a
SIGINT raises ``SystemExit(130)`` after printing ``interrupted``; :func:`n2uq.cli.run_main` lets
that through, and the training loop's :class:`~n2uq.run_control.RunControl` installs its own
handler (finish the step, save, stop) for the epochs and puts this one back afterwards.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import List

__all__ = ["exit_quietly_on_interrupt", "run_child"]


def _interrupted(signum, frame) -> None:
    sys.stderr.write("interrupted\n")
    sys.exit(130)


def exit_quietly_on_interrupt() -> None:
    """Make SIGINT print ``interrupted`` on stderr and exit with status 130 (as a shell reports Ctrl-C)."""
    signal.signal(signal.SIGINT, _interrupted)


def run_child(cmd: List[str], what: str, **popen_kwargs) -> int:
    """Run ``cmd`` to its end and return its exit status.

    SIGINT and SIGTERM received meanwhile are passed on to the child (a training run then finishes
    its step, saves its checkpoint and stops; one Ctrl-C that also reached it directly counts once)
    and waited for; then this process says so in one line, naming ``what`` (e.g. the child's log),
    and exits with ``128 + signal`` (130 for Ctrl-C). ``subprocess.run`` would kill the child a
    quarter of a second after a Ctrl-C, before it could save.
    """
    received: List[int] = []
    with subprocess.Popen(cmd, **popen_kwargs) as child:
        def forward(signum, frame) -> None:
            received.append(signum)
            child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if received:
        sys.stderr.write(f"interrupted: {what} was asked to save and stop (exit status {code}); "
                         f"the same command continues where it stopped\n")
        sys.exit(128 + received[0])
    return code
