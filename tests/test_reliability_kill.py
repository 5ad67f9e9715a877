"""Kill a training run again and again; it must end bit-identical to an uninterrupted one.

A 3-epoch CPU run (ResNet-18 W2A2 on generated images, a mid-epoch checkpoint every 2 steps, one
loader worker) is started as a process group and signalled at seeded random moments chosen among
"during a training step" (forward done), "during a save" (half of the temp file written) and
"during evaluation" (one validation batch done); the instrumented entry point
``tests/instrumented_train.py`` announces these phases and waits in the chosen one, so the signal
lands there. After every signal the checkpoint files present must be readable, and every run
resumes automatically. SIGKILL (like a node failure or the OOM killer) and SIGTERM to the whole
process group (like a scheduler or Ctrl-C: the run must save and exit 0) are both tested.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from n2uq.checkpoint import read_checkpoint
from n2uq.metrics import read_metrics
from tests.conftest import REPO_ROOT
from tests.test_reliability import RUN, child_env, fresh_data, train_argv

EPOCHS = 3
PLAN_SEED = 20240607


def _argv(data, save):
    return [*train_argv(data, save, epochs=EPOCHS), "--save_every_steps", "2", "-j", "1", "--threads", "1"]


def _start(argv, phases: Path, pause_at: str = "") -> subprocess.Popen:
    env = child_env(N2UQ_TEST_PHASES=phases, N2UQ_TEST_PAUSE_AT=pause_at)
    return subprocess.Popen([sys.executable, "-m", "tests.instrumented_train", *argv], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_phase(proc: subprocess.Popen, phases: Path, phase: str, nth: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if phases.exists() and phases.read_text().split().count(phase) >= nth:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before {phase} #{nth}:\n{out}\n{err}")
        time.sleep(0.02)
    pytest.fail(f"no {phase} #{nth} within {timeout} s")


def _assert_checkpoints_readable(run_dir: Path) -> tuple:
    position = None
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        if (run_dir / name).exists():
            ckpt = read_checkpoint(run_dir / name)  # raises if unreadable
            assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
            if name == "checkpoint.pth.tar":
                position = (ckpt["next_epoch"], ckpt["step_in_epoch"])
    return position


def _interrupt(argv, run_dir: Path, tmp: Path, sig: signal.Signals, phase: str, nth: int) -> dict:
    """One invocation, signalled at the ``nth`` ``phase``; returns what was seen."""
    phases = tmp / f"phases_{time.monotonic_ns()}"
    temps_before = {p.name for p in run_dir.glob("*.tmp")}
    proc = _start(argv, phases, f"{phase}:{nth}")
    try:
        _wait_for_phase(proc, phases, phase, nth)
        os.killpg(proc.pid, sig)
        Path(f"{phases}.go").touch()  # a SIGTERMed run goes on from the pause to its next step boundary
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seen = {"signal": sig.name, "phase": phase, "nth": nth, "code": proc.returncode, "out": out, "err": err,
            "temps": {p.name for p in run_dir.glob("*.tmp")} - temps_before,
            "position": _assert_checkpoints_readable(run_dir)}
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, seen
    else:
        assert proc.returncode == 0 and "error" not in err, seen
        assert "run again to resume" in out or f"finished {EPOCHS} epochs" in out, seen
    return seen


def _plan(rng: random.Random, sig: signal.Signals, rounds: int) -> list:
    """``rounds`` times each phase, at a random occurrence (the n-th step or save of the invocation)."""
    most = {"step": 4, "save": 2, "eval": 1}
    plan = [(sig, phase, rng.randint(1, most[phase])) for _ in range(rounds) for phase in most]
    rng.shuffle(plan)
    return plan


def _assert_same_run(reference: Path, resumed: Path) -> None:
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        a, b = read_checkpoint(reference / name), read_checkpoint(resumed / name)
        assert (a["next_epoch"], a["step_in_epoch"], a["epoch"]) == (b["next_epoch"], b["step_in_epoch"], b["epoch"])
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), (name, key)
        for pid, state in a["optimizer"]["state"].items():
            for k, v in state.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][pid][k])), (name, k)
        assert a["best_top1_acc"] == b["best_top1_acc"] and a["val_top1"] == b["val_top1"]
    last = {r["epoch"]: r["val"] for r in read_metrics(str(resumed / "metrics.jsonl"), "epoch")}
    assert last == {r["epoch"]: r["val"] for r in read_metrics(str(reference / "metrics.jsonl"), "epoch")}


@pytest.mark.slow
def test_killed_and_terminated_runs_end_bit_identical(tmp_path):
    data = fresh_data(tmp_path / "data")
    reference = subprocess.run([sys.executable, "-m", "tests.instrumented_train", *_argv(data, tmp_path / "ref"),
                                "-j", "0"], env=child_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=300)
    assert reference.returncode == 0, reference.stderr

    rng = random.Random(PLAN_SEED)
    plan = _plan(rng, signal.SIGKILL, 2) + _plan(rng, signal.SIGTERM, 1)  # 6 kills, then 3 terminations
    run_dir, argv = tmp_path / "killed" / RUN, _argv(data, tmp_path / "killed")
    log = []
    for sig, phase, nth in plan:
        log.append(_interrupt(argv, run_dir, tmp_path, sig, phase, nth))
        if sig == signal.SIGKILL and phase == "save":
            assert log[-1]["temps"], "the kill did not land inside a save"
    final = subprocess.run([sys.executable, "-m", "tests.instrumented_train", *argv], env=child_env(), cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0 and f"finished {EPOCHS} epochs" in final.stdout, final.stderr

    assert [s["phase"] for s in log if s["signal"] == "SIGKILL"].count("save") == 2
    assert not list(run_dir.glob("*.tmp")), "a stale temp file was not cleaned up"
    removed = "".join(s["out"] for s in log) + final.stdout
    for seen in log:
        for name in seen["temps"]:
            assert f"removed {run_dir / name}, left by a save that was interrupted" in removed
    assert sum(s["out"].count("resumed from") for s in log) >= len(plan) - 1
    _assert_same_run(tmp_path / "ref" / RUN, run_dir)


def _signal_after_first_epoch(cmd, env, cwd: Path, run_dir: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Start ``cmd`` as a process group, signal the group once an epoch is logged, wait for the end."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while not ((run_dir / "metrics.jsonl").exists() and read_metrics(str(run_dir / "metrics.jsonl"), "epoch")):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    leftovers = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes left in the group: {leftovers}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_run_sh_waits_for_the_save_on_sigterm(tmp_path):
    """A scheduler signals run.sh's whole group: training saves, the log gets the last line, exit 0."""
    data = fresh_data(tmp_path / "data")
    env = child_env(DATA=data, PYTHON=sys.executable)
    flags = [a for a in _argv(data, tmp_path / "m") if a not in ("--data", str(data))]
    proc = _signal_after_first_epoch(["bash", str(REPO_ROOT / "resnet" / "run.sh"), "resnet18", "2", "0", *flags,
                                      "--epochs", "30"], env, tmp_path, tmp_path / "m" / RUN, signal.SIGTERM)
    assert proc.returncode == 0, proc.stderr
    assert "SIGTERM received" in (tmp_path / "log" / f"{RUN}.txt").read_text()
    ckpt = read_checkpoint(tmp_path / "m" / RUN / "checkpoint.pth.tar")
    assert 1 <= ckpt["next_epoch"] < 30


@pytest.mark.slow
def test_torchrun_ctrl_c_saves_on_every_rank(tmp_path):
    """Ctrl-C reaches each rank twice (terminal and torchrun): still one clean save, no KeyboardInterrupt."""
    data = fresh_data(tmp_path / "data")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO_ROOT / "resnet" / "train.py"), *_argv(data, tmp_path / "m"), "--batch_size", "8", "--epochs", "30"]
    proc = _signal_after_first_epoch(cmd, child_env(), tmp_path, tmp_path / "m" / RUN, signal.SIGINT)
    assert "SIGINT received; " in proc.stdout and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert "error:" not in proc.stderr
    ckpt = read_checkpoint(tmp_path / "m" / RUN / "checkpoint.pth.tar")
    assert 1 <= ckpt["next_epoch"] < 30
