"""Does a saved run hold what a training command asks for? (used before a run is reused or resumed)

A checkpoint of this project records its training's arguments (``args``). Given the flags of a
``train.py`` command, :func:`differences` names every flag whose recorded value differs, so a tool
that reuses a finished run (``demo.sh``, ``scripts/compare_methods.py``) never reports a number
trained under other settings than it states.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from n2uq.checkpoint import read_checkpoint  # noqa: E402

__all__ = ["differences", "recorded_args", "read_checkpoint"]

#: Flags that say where a run goes and how fast it runs, not what it trains.
NOT_RESULTS = {"save", "workers", "no_progress", "threads", "device", "log_every", "resume", "check_only", "debug",
               "epochs_per_run", "steps_per_run", "save_every_steps"}
#: Flags naming a file or folder: the same when they lead to the same place (``--data``: a run trained
#: on other images is another result).
PATHS = {"data"}
SHORT = {"-j": "workers"}


def _is_flag(token: str) -> bool:
    return token.startswith("--") or token in SHORT


def _same(given: Optional[str], recorded: Any, path: bool = False) -> bool:
    if path and given is not None and isinstance(recorded, str):
        return os.path.realpath(given) == os.path.realpath(recorded)
    if given is None:  # a switch (store_true)
        return recorded is True
    if isinstance(recorded, bool):
        return given.strip().lower() in (("1", "true") if recorded else ("0", "false"))
    try:
        return float(given) == float(recorded)
    except (TypeError, ValueError):
        return given == str(recorded)


def differences(flags: Sequence[str], recorded: Mapping[str, Any]) -> List[str]:
    """``"--flag: VALUE asked, RECORDED recorded"`` for each flag in ``flags`` whose value the run's
    recorded arguments do not hold (flags in :data:`NOT_RESULTS` are not compared; those in
    :data:`PATHS` by the place they lead to)."""
    found, i = [], 0
    while i < len(flags):
        flag = flags[i].split("=", 1)[0]
        if not _is_flag(flag):
            i += 1
            continue
        if "=" in flags[i]:
            value: Optional[str] = flags[i].split("=", 1)[1]
            i += 1
        elif i + 1 < len(flags) and not _is_flag(flags[i + 1]):
            value, i = flags[i + 1], i + 2
        else:
            value, i = None, i + 1
        name = SHORT.get(flag, flag.lstrip("-").replace("-", "_"))
        if name in NOT_RESULTS:
            continue
        if name not in recorded:
            found.append(f"{flag}: {value if value is not None else 'set'} asked, not recorded")
        elif not _same(value, recorded[name], name in PATHS):
            found.append(f"{flag}: {value if value is not None else 'set'} asked, {recorded[name]} recorded")
    return found


def recorded_args(checkpoint: Any) -> Mapping[str, Any]:
    """The training arguments a checkpoint (a path, or what :func:`read_checkpoint` returned)
    records; ``{}`` when it records none."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    args = checkpoint.get("args")
    return args if isinstance(args, Mapping) else {}
