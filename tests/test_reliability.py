"""Fault tolerance of the engine: atomic saves, a full disk, non-finite losses, unreadable images,
and the agreement of all ranks on these under torchrun (docs/reliability.md).

The subprocess tests here and in ``test_reliability_kill.py`` run ``python -m tests.instrumented_train
TRAIN-ARGS``: ``resnet/train.py`` with faults injected from the environment.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from n2uq import atomic_io, loop, train_state, trainer
from n2uq import data as D
from n2uq.checkpoint import read_checkpoint
from n2uq.cli import run_main
from n2uq.metrics import read_metrics
from resnet import train as resnet_train
from tests.conftest import REPO_ROOT, make_image_folder

RUN = "resnet18_2bit_quantize_downsample_False"
STEPS = 6  # 24 training images, batch 4


def train_argv(data, save, *extra, epochs=1):
    """The tiny run; ``epochs=1`` is the first epoch of a two-epoch schedule (``--epochs 1`` alone would
    train at lr 0, which is refused)."""
    schedule = ["--epochs", "2", "--epochs_per_run", "1"] if epochs == 1 else ["--epochs", str(epochs)]
    return ["--data", str(data), "--save", str(save), *schedule, "--quantize_downsample", "False", "--batch_size", "4",
            "--image_size", "16", "--val_resize", "16", "--teacher", "none", "--pretrained", "none", "-j", "0",
            "--no_progress", "--seed", "1", *extra]


def run_cli(main, argv, capsys):
    """``run_main(main, argv)`` in process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def fresh_data(root, bad=()):
    """24 training (8 per class) and 7 validation images; ``bad``: relative paths to corrupt."""
    make_image_folder(root, classes=3, train_per_class=8, val_per_class=[3, 2, 2], size=16, seed=5)
    for rel in bad:
        (Path(root) / rel).write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return Path(root)


@pytest.fixture
def data(tmp_path):
    return fresh_data(tmp_path / "data")


def assert_finite_checkpoint(path):
    ckpt = read_checkpoint(path)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    return ckpt


# ------------------------------------------------------------------------------------------------
# Atomic saves and a full disk
# ------------------------------------------------------------------------------------------------


class _DeviceFull(io.RawIOBase):
    """A file object that takes ``budget`` bytes, then fails with ENOSPC."""

    def __init__(self, inner, budget):
        self.inner, self.budget = inner, budget

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(b)
        return self.inner.write(b)


def _full_disk_after(monkeypatch, saves_that_fit: int, budget: int = 4096):
    """``torch.save`` succeeds ``saves_that_fit`` times, then its file fills up after ``budget`` bytes."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > saves_that_fit:
            f = _DeviceFull(f, budget)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_atomic_save_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    atomic_io.atomic_save({"state_dict": {"w": torch.ones(3)}}, str(path))
    _full_disk_after(monkeypatch, saves_that_fit=0)
    with pytest.raises(atomic_io.CheckpointSaveError, match="no space left on the device; the previous "
                                                              "checkpoint there is kept. Free space on"):
        atomic_io.atomic_save({"state_dict": {"w": torch.zeros(10_000)}}, str(path))
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]  # the temp file is gone


def test_stale_temp_files_are_removed_and_only_they(tmp_path):
    for name in ("checkpoint.pth.tar.abc123.tmp", "model_best.pth.tar.x_1.tmp", "notes.tmp", "checkpoint.pth.tar"):
        (tmp_path / name).write_bytes(b"x")
    removed = sorted(Path(p).name for p in atomic_io.remove_stale_temps(str(tmp_path), train_state.CHECKPOINT_FILES))
    assert removed == ["checkpoint.pth.tar.abc123.tmp", "model_best.pth.tar.x_1.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth.tar", "notes.tmp"]
    assert atomic_io.remove_stale_temps(str(tmp_path / "missing"), train_state.CHECKPOINT_FILES) == []


def test_no_space_while_saving_stops_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    """The first (mid-epoch) save fits, the next one finds the device full."""
    _full_disk_after(monkeypatch, saves_that_fit=1)
    code, _, err = run_cli(resnet_train.main, train_argv(data, tmp_path / "m", "--save_every_steps", "2"), capsys)
    line = one_error_line(err)
    assert code == 1 and f"cannot write checkpoint {tmp_path / 'm' / RUN / 'checkpoint.pth.tar'}" in line
    assert "no space left on the device; the previous checkpoint there is kept" in line
    ckpt = read_checkpoint(tmp_path / "m" / RUN / "checkpoint.pth.tar")
    assert (ckpt["next_epoch"], ckpt["step_in_epoch"]) == (0, 2)
    assert sorted(p.name for p in (tmp_path / "m" / RUN).iterdir()) == ["checkpoint.pth.tar", "metrics.jsonl", "tb"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def test_full_tmpfs_device_gives_one_line(data, tmp_path, capsys):
    """A real full device (a 1 MiB tmpfs; skipped where mounting is not allowed)."""
    disk = tmp_path / "small_disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        code, _, err = run_cli(resnet_train.main, train_argv(data, disk), capsys)
        line = one_error_line(err)
        assert code == 1 and f"cannot write checkpoint {disk / RUN}/" in line
        assert "the device is full" in line or "no space left" in line
        assert not [p for p in (disk / RUN).iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_repeated_sigint_within_the_window_is_the_same_ctrl_c(monkeypatch):
    """torchrun forwards Ctrl-C to ranks that got it from the terminal too; only a later one interrupts."""
    import signal

    from n2uq import run_control

    monkeypatch.setattr(run_control, "REPEAT_WINDOW_S", 0.3)
    with run_control.RunControl() as control:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert control.signal_name == "SIGINT" and control.step_done()
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# Non-finite losses
# ------------------------------------------------------------------------------------------------


def _nan_loss_at(monkeypatch, *calls):
    real, count = loop.label_smooth_ce, [0]

    def loss(*args, **kwargs):
        count[0] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if count[0] in calls else value

    monkeypatch.setattr(loop, "label_smooth_ce", loss)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, 4)
    code, _, err = run_cli(resnet_train.main, train_argv(data, tmp_path, "--save_every_steps", "2"), capsys)
    line = one_error_line(err)
    assert code == 1 and f"non-finite loss (nan) in epoch 1, step 4/{STEPS}" in line
    assert f"the last good state is {tmp_path / RUN / 'checkpoint.pth.tar'} (epoch 1 after step 2)" in line
    assert "--skip_nonfinite" in line
    ckpt = assert_finite_checkpoint(tmp_path / RUN / "checkpoint.pth.tar")
    assert (ckpt["next_epoch"], ckpt["step_in_epoch"]) == (0, 2)


def test_nonfinite_weights_are_never_saved():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(loop.NonFiniteError, match="non-finite weights at the save of epoch 2 after step 3"):
        trainer.check_finite_weights(model, train_state.TrainProgress(1, 3), torch.device("cpu"))


def test_skip_nonfinite_skips_the_step_and_counts_it_across_a_resume(data, tmp_path, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, 3)
    code, out, _ = run_cli(resnet_train.main, train_argv(data, tmp_path, "--skip_nonfinite", "--steps_per_run", "4"),
                           capsys)
    assert code == 0 and f"skipped a batch with a non-finite loss (nan) in epoch 1, step 3/{STEPS}" in out
    assert read_checkpoint(tmp_path / RUN / "checkpoint.pth.tar")["skipped"]["nonfinite_batches"] == 1
    code, out, _ = run_cli(resnet_train.main, train_argv(data, tmp_path, "--skip_nonfinite"), capsys)
    assert code == 0 and "| skipped 1 non-finite-loss batch(es)" in out  # the epoch summary, after the resume
    metrics = str(tmp_path / RUN / "metrics.jsonl")
    assert read_metrics(metrics, "epoch")[-1]["skipped"]["nonfinite_batches"] == 1
    assert [(r["epoch"], r["step"]) for r in read_metrics(metrics, "skipped_batch")] == [(0, 2)]
    ckpt = assert_finite_checkpoint(tmp_path / RUN / "checkpoint.pth.tar")
    adam_steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert adam_steps == {STEPS - 1}  # no optimizer step for the skipped batch


# ------------------------------------------------------------------------------------------------
# Unreadable images
# ------------------------------------------------------------------------------------------------


def test_unreadable_train_image_stops_with_its_path_and_saves_the_position(tmp_path, capsys):
    """A loader worker (-j 1) too: the message is one line naming the file; fixing it and rerunning resumes."""
    data = fresh_data(tmp_path / "data", bad=["train/class_1/003.png"])
    code, _, err = run_cli(resnet_train.main, train_argv(data, tmp_path / "m", "-j", "1"), capsys)
    line = one_error_line(err)
    bad = data / "train" / "class_1" / "003.png"
    assert code == 1 and f"unreadable image {bad} (UnidentifiedImageError: cannot identify image file)" in line
    assert "--skip_bad_images" in line
    ckpt_path = tmp_path / "m" / RUN / "checkpoint.pth.tar"
    if ckpt_path.exists():  # not when the image is in the first batch
        step = read_checkpoint(ckpt_path)["step_in_epoch"]
        assert f"step {step + 1};" in line and f"(epoch 1 after step {step}) is saved" in line
    shutil.copy(data / "train" / "class_1" / "002.png", bad)
    code, out, _ = run_cli(resnet_train.main, train_argv(data, tmp_path / "m"), capsys)
    assert code == 0 and "epoch 1/2 lr" in out


def test_skip_bad_images_counts_them_and_survives_batches_without_any_readable_image(tmp_path, capsys):
    bad = [f"train/class_{k}/{i:03d}.png" for k in range(3) for i in range(6)] + ["val/class_0/001.png"]
    data = fresh_data(tmp_path / "data", bad=bad)  # 18 of 24 training images unreadable
    code, out, _ = run_cli(resnet_train.main, train_argv(data, tmp_path / "m", "--skip_bad_images", "--batch_size",
                                                         "2", "--save_every_steps", "3"), capsys)
    assert code == 0, out
    rec = read_metrics(str(tmp_path / "m" / RUN / "metrics.jsonl"), "epoch")[-1]
    samples = D.image_folder(str(data), "train", None).samples
    readable = [sum(not Path(samples[i][0]).read_bytes().startswith(b"\x89PNG\r\n\x1a\n not") for i in pair)
                for pair in zip(*[iter(D.TrainSampler(24, seed=1).indices())] * 2)]
    assert rec["skipped"]["bad_images"] == 18 and rec["train"]["images"] == 2 * readable.count(2)
    assert rec["skipped"]["short_batches"] == readable.count(1) + readable.count(0) > 0
    assert rec["val"]["count"] == 6 and rec["val"]["skipped"] == 1
    assert "| skipped 18 unreadable train image(s), 1 unreadable val image(s), " in out
    logged = read_metrics(str(tmp_path / "m" / RUN / "metrics.jsonl"), "bad_image")
    assert len(logged) == 19 and {r["split"] for r in logged} == {"train", "val"}
    assert_finite_checkpoint(tmp_path / "m" / RUN / "checkpoint.pth.tar")


def test_unreadable_val_image_stops_after_saving_the_trained_epoch(tmp_path, capsys):
    data = fresh_data(tmp_path / "data", bad=["val/class_2/000.png"])
    code, _, err = run_cli(resnet_train.main, train_argv(data, tmp_path / "m"), capsys)
    line = one_error_line(err)
    assert code == 1 and f"unreadable image {data / 'val' / 'class_2' / '000.png'}" in line
    assert "while evaluating" in line and "the epoch's training is saved" in line
    ckpt = read_checkpoint(tmp_path / "m" / RUN / "checkpoint.pth.tar")
    assert (ckpt["next_epoch"], ckpt["step_in_epoch"]) == (0, STEPS)
    code, out, _ = run_cli(resnet_train.main, train_argv(data, tmp_path / "m", "--skip_bad_images"), capsys)
    # no step is left to train, yet the epoch line reports the epoch's training: the checkpoint kept its sums
    assert code == 0 and "epoch 1/2 lr 0.000625 | train loss " in out and " only:" not in out
    rec = read_metrics(str(tmp_path / "m" / RUN / "metrics.jsonl"), "epoch")[-1]
    assert (rec["val"]["count"], rec["val"]["skipped"]) == (6, 1)
    assert (rec["train"]["images"], rec["train"]["from_step"]) == (24, 0)


# ------------------------------------------------------------------------------------------------
# torchrun: every rank takes the same decision
# ------------------------------------------------------------------------------------------------


def child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_WAIT_POLICY="PASSIVE")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun(argv, env, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.instrumented_train", *argv]
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_nonfinite_loss_on_one_rank_stops_every_rank(data, tmp_path):
    """Only rank 1 sees the NaN; both ranks stop at the same step with the same message, none hangs."""
    proc = torchrun([*train_argv(data, tmp_path, "--batch_size", "8", "--threads", "1"), "--save_every_steps", "1"],
                    child_env(N2UQ_TEST_NAN="1:2"))
    assert proc.returncode != 0
    errors = sorted(ln for ln in proc.stderr.splitlines() if "error: non-finite loss" in ln)
    assert [e.split("]")[0] for e in errors] == ["[rank 0", "[rank 1"], proc.stderr
    assert all("non-finite loss (nan) in epoch 1, step 2/3" in e and "(epoch 1 after step 1)" in e for e in errors)
    ckpt = read_checkpoint(tmp_path / RUN / "checkpoint.pth.tar")
    assert ckpt["step_in_epoch"] == 1
    assert ckpt["train_sums"]["images"] == 8  # both ranks' 4 images of step 1: the sums are over all ranks


@pytest.mark.slow
def test_skips_agree_across_ranks(tmp_path):
    """--skip_nonfinite and --skip_bad_images under torchrun: same counts as the faults injected."""
    data = fresh_data(tmp_path / "data", bad=["train/class_0/004.png", "val/class_1/000.png"])
    proc = torchrun([*train_argv(data, tmp_path / "m", "--batch_size", "8", "--threads", "1", epochs=2),
                     "--skip_nonfinite", "--skip_bad_images"], child_env(N2UQ_TEST_NAN="1:2"))
    assert proc.returncode == 0, proc.stderr
    epochs = read_metrics(str(tmp_path / "m" / RUN / "metrics.jsonl"), "epoch")
    assert [r["skipped"]["bad_images"] for r in epochs] == [1, 1]
    assert [r["skipped"]["nonfinite_batches"] for r in epochs] == [1, 0]
    assert [(r["val"]["count"], r["val"]["skipped"]) for r in epochs] == [(6, 1), (6, 1)]
    # the whole step with rank 1's NaN is left out on both ranks (8 images), and the unreadable one
    assert epochs[0]["train"]["images"] in (24 - 8, 24 - 8 - 1) and epochs[1]["train"]["images"] == 23
    assert_finite_checkpoint(tmp_path / "m" / RUN / "checkpoint.pth.tar")


def test_a_corrupt_checkpoint_names_model_best_only_when_it_is_there(tmp_path):
    """--resume auto on a truncated checkpoint: the message points at model_best.pth.tar only if it exists."""
    from n2uq.checkpoint import CheckpointError
    from n2uq.resume import read_resume

    path = tmp_path / train_state.CHECKPOINT_NAME
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError) as exc:
        read_resume(str(path), auto=True)
    assert "move it away or pass --resume none to start over" in str(exc.value)
    assert train_state.BEST_NAME not in str(exc.value)
    torch.save({"state_dict": {}}, tmp_path / train_state.BEST_NAME)
    with pytest.raises(CheckpointError, match=r"\(model_best\.pth\.tar beside it holds the best epoch\)$"):
        read_resume(str(path), auto=True)
    with pytest.raises(CheckpointError, match="pass another --resume file") as exc:
        read_resume(str(path), auto=False)
    assert train_state.BEST_NAME not in str(exc.value)
