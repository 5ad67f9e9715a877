"""Ctrl-C while a script starts (importing torch alone takes a second or more): one line and exit
status 130, never a traceback from inside an import.

Standard library only, so that a script can install it before its heavy imports. From then on a
SIGINT raises ``SystemExit(130)`` after printing ``interrupted``; :func:`n2uq.cli.run_main` lets
that through, and the training loop's :class:`~n2uq.run_control.RunControl` installs its own
handler (finish the step, save, stop) for the epochs and puts this one back afterwards.
"""

from __future__ import annotations

import signal
import sys

__all__ = ["exit_quietly_on_interrupt"]


def _interrupted(signum, frame) -> None:
    sys.stderr.write("interrupted\n")
    sys.exit(130)


def exit_quietly_on_interrupt() -> None:
    """Make SIGINT print ``interrupted`` on stderr and exit with status 130 (as a shell reports Ctrl-C)."""
    signal.signal(signal.SIGINT, _interrupted)
