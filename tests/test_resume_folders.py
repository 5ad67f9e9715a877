"""A resumed run stays one run: on the class folders it was trained on, and with its best epoch in
the folder it goes on in (docs/training.md, "Checkpoints and resume")."""

from __future__ import annotations

import shutil

import torch

from n2uq.checkpoint import read_checkpoint
from n2uq.train_state import BEST_NAME, CHECKPOINT_NAME
from resnet import train as resnet_train
from tests.test_reliability import RUN, fresh_data, one_error_line, run_cli, train_argv


def test_resuming_on_other_class_folders_is_refused_before_anything_is_written(tmp_path, capsys):
    data, save = fresh_data(tmp_path / "data"), tmp_path / "runs"
    assert run_cli(resnet_train.main, train_argv(data, save), capsys)[0] == 0  # epoch 1 of 2
    for split in ("train", "val"):  # class_z sorts last: every label shifts
        (data / split / "class_0").rename(data / split / "class_z")
    run_dir = save / RUN
    (run_dir / f"{CHECKPOINT_NAME}.x1.tmp").write_bytes(b"left by a killed save")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    code, _, err = run_cli(resnet_train.main, train_argv(data, save), capsys)
    line = one_error_line(err)
    assert code == 2, err
    assert line.startswith(f"error: the run's checkpoint {run_dir / CHECKPOINT_NAME} was trained on other class "
                           f"folders (only in the checkpoint: class_0; only in this run's data: class_z)"), line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def _record_best(run_dir, best: float) -> None:
    """Both files of the run say its best epoch scored ``best`` (as if epoch 1 had)."""
    for name in (CHECKPOINT_NAME, BEST_NAME):
        ckpt = read_checkpoint(run_dir / name)
        ckpt["best_top1_acc"] = best
        torch.save(ckpt, run_dir / name)


def test_a_run_resumed_into_another_folder_takes_its_best_epoch_along(tmp_path, capsys):
    data, first = fresh_data(tmp_path / "data"), tmp_path / "m9" / RUN
    assert run_cli(resnet_train.main, train_argv(data, tmp_path / "m9"), capsys)[0] == 0
    _record_best(first, 100.0)  # no later epoch beats it

    moved = tmp_path / "m10" / RUN
    code, out, err = run_cli(resnet_train.main, train_argv(data, tmp_path / "m10", "--resume",
                                                           str(first / CHECKPOINT_NAME), epochs=2), capsys)
    assert code == 0, err
    assert f"copied the best epoch so far (top-1 100.00) from {first / BEST_NAME} to {moved / BEST_NAME}" in out
    assert f"finished 2 epochs: best val top-1 100.00 ({moved / BEST_NAME})" in out, out
    assert (moved / BEST_NAME).read_bytes() == (first / BEST_NAME).read_bytes()

    lone = tmp_path / "lone" / CHECKPOINT_NAME  # a checkpoint without its run's model_best
    lone.parent.mkdir()
    shutil.copy(first / CHECKPOINT_NAME, lone)
    elsewhere = tmp_path / "m11" / RUN
    code, out, err = run_cli(resnet_train.main, train_argv(data, tmp_path / "m11", "--resume", str(lone), epochs=2),
                             capsys)
    assert code == 0, err
    assert (f"finished 2 epochs: best val top-1 100.00 (no {BEST_NAME} in {elsewhere}: the best epoch was saved by "
            f"an earlier run)") in out, out
    assert not (elsewhere / BEST_NAME).exists()
