"""Ctrl-C in a script that runs training as a child process: the child is asked to save and stop and
is waited for (never killed), and the script exits 130 with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for a training run: on SIGINT it takes a while to "save", then exits 130.
CHILD = textwrap.dedent("""
    import signal, sys, time
    def save_and_stop(signum, frame):
        time.sleep(1.0)  # longer than subprocess.run's 0.25 s grace before it kills
        open(sys.argv[1], "w").write("saved")
        sys.exit(130)
    signal.signal(signal.SIGINT, save_and_stop)
    open(sys.argv[2], "w").write("started")
    time.sleep(60)
""")

PARENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[4])
    from scripts.interrupt import run_child
    code = run_child([sys.executable, sys.argv[1], sys.argv[2], sys.argv[3]], "the stand-in run")
    print("returned", code)
""")


def test_ctrl_c_waits_for_the_child_to_save_and_exits_130(tmp_path):
    child, saved, started = tmp_path / "child.py", tmp_path / "saved", tmp_path / "started"
    child.write_text(CHILD)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(child), str(saved), str(started), str(ROOT)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists(), parent.communicate(timeout=5)
    os.killpg(parent.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group
    out, err = parent.communicate(timeout=60)
    assert saved.read_text() == "saved"  # not killed before it saved
    assert parent.returncode == 130 and "returned" not in out
    assert err.strip().splitlines() == [
        "interrupted: the stand-in run was asked to save and stop (exit status 130); "
        "the same command continues where it stopped"]
