"""demo.sh: option handling, its one-line failures, and reusing what exists.

The script is pointed at a temporary work folder (``N2UQ_DEMO_WORKDIR``), an idx-file folder of
the test's choosing (``N2UQ_DEMO_SOURCE``), no apt (``N2UQ_DEMO_APT_GET=none``) and no download
(``N2UQ_DEMO_DOWNLOAD=0``), and runs with the test's own Python (``--env active``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, make_image_folder, write_idx

DEMO = REPO_ROOT / "demo.sh"


def _env(work: Path, source: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("N2UQ_DEMO_")}
    env.update({"N2UQ_DEMO_WORKDIR": str(work), "N2UQ_DEMO_SOURCE": str(source), "N2UQ_DEMO_APT_GET": "none",
                "N2UQ_DEMO_DOWNLOAD": "0", "PYTHON": sys.executable, **extra})
    return env


def run_demo(args: List[str], work: Path, source: Optional[Path] = None, timeout: float = 300,
             **extra: str) -> subprocess.CompletedProcess:
    source = source if source is not None else work / "no_source"
    return subprocess.run(["bash", str(DEMO), *args], env=_env(work, source, **extra), cwd=work,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def error_lines(proc: subprocess.CompletedProcess) -> List[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("args, expected", [
    (["--frobnicate"], "unknown option '--frobnicate'"),
    (["--bits", "9"], "--bits must be an integer in 1..8, got '9'"),
    (["--bits=two"], "--bits must be an integer in 1..8, got 'two'"),
    (["--bits"], "--bits needs a value"),
    (["--arch", "vgg16"], "--arch must be resnet18, resnet34, resnet50 or mobilenetv2"),
    (["--epochs", "0"], "--epochs must be an integer of at least 2"),
    (["--epochs", "1"], "the paper's schedule trains the last epoch at lr 0"),
    (["--train-per-class", "7000"], "--train-per-class must be an integer in 1..6000"),
    (["--env", "conda"], "--env must be auto, active or venv"),
    (["--arch", "mobilenetv2", "--quantize-downsample"], "--quantize-downsample is for the ResNets"),
])
def test_bad_options_give_one_line_and_exit_2(tmp_path, args, expected):
    proc = run_demo(args, tmp_path, timeout=30)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("demo.sh: error: ") and expected in lines[0], proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "log").exists()  # nothing was started


def test_help_lists_the_options(tmp_path):
    proc = run_demo(["--help"], tmp_path, timeout=30)
    assert proc.returncode == 0
    for option in ("--bits", "--arch", "--quick", "--fresh", "--env", "--source", "active", "venv"):
        assert option in proc.stdout


def test_no_apt_and_no_data_is_one_line_exit_3(tmp_path):
    empty = tmp_path / "empty_source"
    empty.mkdir()
    proc = run_demo(["--env", "active", "--quick"], tmp_path, source=empty, CC="no-such-compiler-n2uq")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("demo.sh: data failed: no Fashion-MNIST idx files in " + str(empty)), lines[0]
    assert "no apt-get to install them" in lines[0] and "dataset-fashion-mnist" in lines[0]
    assert "--source DIR" in lines[0]
    # the chosen environment is stated first; a missing compiler is said once
    out = proc.stdout.splitlines()
    assert out[1].startswith(f"python: {sys.executable} (") and "the active environment; --env active" in out[1]
    assert sum("no C compiler" in line for line in out) == 1
    assert not (tmp_path / "models").exists()


def test_venv_is_stated_and_a_failed_install_is_one_line(tmp_path):
    # pip without an index: creating ./.venv works, installing the requirements into it fails
    proc = run_demo(["--env", "venv", "--quick"], tmp_path, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (tmp_path / ".venv" / "bin" / "python").exists()
    out = proc.stdout.splitlines()
    assert out[1].startswith(f"python: {tmp_path}/.venv/bin/python (") and "a local ./.venv; --env venv;" in out[1]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("demo.sh: setup failed: pip install -e . failed (No matching distribution found for ")
    assert "check the network" in lines[0]
    assert lines[0].endswith("(full log: log/demo/setup.log)")


def test_a_failed_venv_creation_removes_only_what_it_made(tmp_path):
    python = tmp_path / "python_without_venv"
    python.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m venv" ] && {{ echo "venv: no ensurepip" >&2; exit 1; }}\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    for there_before in (False, True):
        if there_before:
            (tmp_path / ".venv").mkdir()
            (tmp_path / ".venv" / "notes.txt").write_text("mine")
        proc = run_demo(["--env", "venv", "--quick"], tmp_path, PYTHON=str(python))
        lines = error_lines(proc)
        assert proc.returncode == 1 and len(lines) == 1 and "cannot create ./.venv" in lines[0], proc.stderr
        assert (tmp_path / ".venv" / "notes.txt").exists() == there_before


def test_source_without_idx_files_is_exit_3(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    proc = run_demo(["--env", "active", "--source", str(other), "--quick"], tmp_path)
    assert proc.returncode == 3
    lines = error_lines(proc)
    assert len(lines) == 1 and f"no Fashion-MNIST idx files in {other} (--source)" in lines[0], proc.stderr


def test_a_method_after_double_dash_is_named(tmp_path):
    empty = tmp_path / "empty_source"
    empty.mkdir()
    proc = run_demo(["--env", "active", "--quick", "--", "--method=lsq"], tmp_path, source=empty)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith("N2UQ demo: W2A2 resnet18, LSQ, on Fashion-MNIST (500 train / 200 val images"), \
        proc.stdout


def _quick_data_and_run(work: Path, checkpoint: bytes) -> Path:
    """The quick mode's complete data set and its run folder holding ``checkpoint``; returns the run."""
    make_image_folder(work / "data" / "fashion_mnist_50x20", classes=10, train_per_class=50, val_per_class=20,
                      size=8)
    run = work / "models" / "demo" / "fashion_mnist_50x20_2ep" / "resnet18_2bit_quantize_downsample_False"
    run.mkdir(parents=True)
    (run / "checkpoint.pth.tar").write_bytes(checkpoint)
    return run


def _old_work(work: Path) -> Dict[Path, bytes]:
    """A finished-looking quick run with its logs and exports; returns every file and its bytes."""
    run = _quick_data_and_run(work, b"old run")
    name = f"{run.parent.name}/{run.name}"
    for folder in (work / "log" / "demo" / name, work / "exports" / "demo" / name):
        folder.mkdir(parents=True)
        (folder / "kept.txt").write_text("old")
    return {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}


def _quick_source(work: Path) -> Path:
    source = work / "idx"
    source.mkdir()
    _write_idx(source, "train", 50, 0)
    _write_idx(source, "val", 20, 1)
    return source


def test_fresh_deletes_nothing_before_every_input_is_checked(tmp_path):
    before = _old_work(tmp_path)
    # a --source without the files: refused before anything starts
    proc = run_demo(["--env", "active", "--quick", "--fresh", "--source", str(tmp_path / "nope")], tmp_path)
    assert proc.returncode == 3 and proc.stdout == "", proc.stdout + proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and f"no Fashion-MNIST idx files in {tmp_path / 'nope'} (--source)" in lines[0], lines
    assert {p: p.read_bytes() for p in before} == before

    # damaged idx files: the data is not rebuilt, the run not deleted
    source = _quick_source(tmp_path)
    labels = source / "train-labels-idx1-ubyte.gz"
    good_labels = labels.read_bytes()
    labels.write_bytes(good_labels[: len(good_labels) // 2])
    proc = run_demo(["--env", "active", "--quick", "--fresh"], tmp_path, source=source)
    lines = error_lines(proc)
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("demo.sh: data failed: "), proc.stderr
    assert "train-labels-idx1-ubyte" in lines[0]
    assert {p: p.read_bytes() for p in before} == before
    labels.write_bytes(good_labels)

    # a training flag after -- that train.py refuses: the old run stays
    proc = run_demo(["--env", "active", "--quick", "--fresh", "--", "--epochs_per_run", "-3"], tmp_path,
                    source=source)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("demo.sh: train failed: ") and "--epochs_per_run" in lines[0], lines
    assert "nothing was deleted" in lines[0]
    run_files = [p for p in before if "/models/" in str(p) or "/exports/" in str(p) or "/log/demo/fashion" in str(p)]
    assert run_files and {p: p.read_bytes() for p in run_files} == {p: before[p] for p in run_files}

    # a flag after -- that the demo sets itself (run.sh would refuse it only after the deletion), and
    # an empty option value (which used to fall back to the default): usage errors, nothing deleted
    for args in (["--fresh", "--", "--n_bit", "4"], ["--fresh", "--", "--save=elsewhere"], ["--epochs="]):
        proc = run_demo(["--env", "active", "--quick", *args], tmp_path, source=source)
        lines = error_lines(proc)
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("demo.sh: error: "), proc.stderr
    assert {p: p.read_bytes() for p in run_files} == {p: before[p] for p in run_files}


def test_fresh_with_good_inputs_starts_the_run_over(tmp_path):
    before = _old_work(tmp_path)
    source = _quick_source(tmp_path)
    proc = subprocess.Popen(["bash", str(DEMO), "--env", "active", "--quick", "--fresh"],
                            env=_env(tmp_path, source), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        seen = []
        for line in proc.stdout:  # stop it as soon as the training starts
            seen.append(line)
            if line.startswith("train: "):
                break
        assert seen[-1].startswith("train: W2A2 resnet18 (N2UQ) from scratch"), "".join(seen)
        assert any(line.startswith("data: building data/fashion_mnist_50x20") for line in seen)
        assert not any(p.exists() for p in before if "/models/" in str(p) or "/exports/" in str(p))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_unreadable_checkpoint_is_one_line(tmp_path):
    _quick_data_and_run(tmp_path, b"truncated")
    proc = run_demo(["--env", "active", "--quick"], tmp_path)
    assert proc.returncode == 1
    assert "data: reusing data/fashion_mnist_50x20 (500 train / 200 val images" in proc.stdout
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("demo.sh: train failed: ") and "--fresh" in lines[0], proc.stderr


def test_readme_by_hand_steps_use_the_demo_run_folder():
    """The README's by-hand commands train, evaluate and export where demo.sh does (its defaults)."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme[readme.index("The same steps by hand:"):]
    block = block[:block.index("## Tests")]
    run = "models/demo/fashion_mnist_8ep/resnet18_2bit_quantize_downsample_False"
    assert "--save models/demo/fashion_mnist_8ep " in block
    checkpoints = [line.split("--checkpoint ")[1].split()[0] for line in block.splitlines() if "--checkpoint " in line]
    assert checkpoints == [f"{run}/model_best.pth.tar"] * 2, checkpoints
    assert "--out exports/demo/fashion_mnist_8ep/resnet18_2bit_quantize_downsample_False" in block
    text = DEMO.read_text()  # the defaults those folders come from
    assert 'SAVE="models/demo/$SETTING" RUNDIR="models/demo/$SETTING/$RUN"' in text
    assert 'SETTING="$(basename "$DATA")_${EPOCHS}ep"' in text and "DATA=data/fashion_mnist;" in text


def test_a_run_of_other_flags_is_neither_reused_nor_resumed(tmp_path):
    import torch

    demo_args = {"student": "resnet18", "n_bit": 2, "quantize_downsample": False, "teacher": "none",
                 "pretrained": "none", "epochs": 2, "batch_size": 128, "learning_rate": 0.002, "image_size": 32,
                 "val_resize": 32, "min_crop_scale": 1.0, "method": "n2uq", "data": "data/fashion_mnist_50x20"}
    run = _quick_data_and_run(tmp_path, b"")
    for args, expected in (({**demo_args, "learning_rate": 0.01}, "--learning_rate: 2e-3 asked, 0.01 recorded"),
                           (demo_args, "--label_smooth: 0.3 asked, 0.1 recorded")):
        torch.save({"next_epoch": 2, "step_in_epoch": 0, "best_top1_acc": 50.0, "args": {**args, "label_smooth": 0.1}},
                   run / "checkpoint.pth.tar")
        extra = ["--", "--label_smooth", "0.3"] if args is demo_args else []
        proc = run_demo(["--env", "active", "--quick", *extra], tmp_path)
        lines = error_lines(proc)
        assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
        assert lines[0].startswith(f"demo.sh: train failed: {run.relative_to(tmp_path)} was trained with other "
                                   f"settings ({expected}); run with --fresh to retrain"), lines[0]


def test_script_style():
    text = DEMO.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert len(text.splitlines()) <= 400
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    libraries = [str(REPO_ROOT / "scripts" / name) for name in ("demo_lib.sh", "launch_lib.sh")]
    proc = subprocess.run(["shellcheck", str(DEMO), *libraries], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _write_idx(folder: Path, split: str, per_class: int, seed: int) -> None:
    """Fashion-MNIST-format idx.gz files: ``per_class`` 28x28 images of each of 10 classes."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    x = (rng.integers(0, 60, size=(len(y), 28, 28)) + y[:, None, None] * 19).astype(np.uint8)
    write_idx(folder, x, y, split)


@pytest.mark.slow
def test_end_to_end_then_reuse(tmp_path):
    """A tiny end-to-end run (data from idx files, 2 epochs, evaluate, export); the second call
    rebuilds, retrains and re-exports nothing."""
    source = tmp_path / "idx"
    source.mkdir()
    _write_idx(source, "train", 13, 0)
    _write_idx(source, "val", 3, 1)
    args = ["--env", "active", "--epochs", "2", "--train-per-class", "13", "--val-per-class", "3"]
    first = run_demo(args, tmp_path, source=source)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "data: building data/fashion_mnist_13x3 (130 train / 30 val images" in first.stdout
    assert "  epoch 2/2 lr 0 | train loss" in first.stdout
    run = tmp_path / "models" / "demo" / "fashion_mnist_13x3_2ep" / "resnet18_2bit_quantize_downsample_False"
    exports = tmp_path / "exports" / "demo" / "fashion_mnist_13x3_2ep" / "resnet18_2bit_quantize_downsample_False"
    assert (run / "model_best.pth.tar").is_file() and (run / "tb").is_dir()
    assert (exports / "resnet18_w2a2_qd0.n2uq").is_file()
    assert first.stdout.startswith("N2UQ demo: W2A2 resnet18, N2UQ, on Fashion-MNIST (130 train / 30 val images")
    assert any(line.startswith("W2A2 resnet18, N2UQ, Fashion-MNIST 130 train / 30 val images, 2 epochs: top-1 ")
               and "(integer ONNX model in onnxruntime: " in line for line in first.stdout.splitlines())
    # the exports line names each file once, comma-separated
    exports_line = next(line for line in first.stdout.splitlines() if line.startswith("  exports "))
    names = sorted(p.name for p in exports.iterdir())
    assert exports_line.endswith(": " + ", ".join(f"{n} ({_du(exports / n)})" for n in names)), exports_line
    logs = tmp_path / "log" / "demo" / "fashion_mnist_13x3_2ep" / "resnet18_2bit_quantize_downsample_False"
    assert (logs / "summary.txt").read_text() in first.stdout
    stamps = {p: p.stat().st_mtime_ns for p in (run / "checkpoint.pth.tar", run / "model_best.pth.tar",
                                                 *exports.iterdir(), *(tmp_path / "data").rglob("*.png"))}

    second = run_demo(args, tmp_path, source=tmp_path / "gone")  # the source is not needed any more
    assert second.returncode == 0, second.stdout + second.stderr
    assert "data: reusing data/fashion_mnist_13x3 (130 train / 30 val images" in second.stdout
    assert "train: reusing the finished run models/demo/fashion_mnist_13x3_2ep/" in second.stdout
    assert "evaluate: up to date" in second.stdout and "export: up to date" in second.stdout
    assert "epoch 2/2" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    top1 = [line for line in first.stdout.splitlines() if line.startswith("evaluate: top-1")]
    assert top1 and top1 == [line for line in second.stdout.splitlines() if line.startswith("evaluate: top-1")]

    # A rebuilt data set is evaluated and exported again (a number is never reused across data sets).
    next(iter(sorted((tmp_path / "data" / "fashion_mnist_13x3" / "val").rglob("*.png")))).unlink()
    third = run_demo(args, tmp_path, source=source)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "data: data/fashion_mnist_13x3 is incomplete" in third.stdout and "train: reusing" in third.stdout
    assert "evaluate: up to date" not in third.stdout and "export: up to date" not in third.stdout
    assert [line for line in third.stdout.splitlines() if line.startswith("evaluate: top-1")] == top1

    # The summary's table tool on the demo's models folder finds the run and gives evaluate.py's number,
    # measured at the 32x32 the run was trained at.
    table = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "reproduce_tables.py"), "--models", "models/",
                            "--data", "data/fashion_mnist_13x3", "-j", "0"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert table.returncode == 0, table.stdout + table.stderr
    evaluated = top1[0].split()[2]  # "evaluate: top-1 NN.NN%  ..."
    assert f"resnet18_w2a2_qd0 top-1 {evaluated.rstrip('%')} " in table.stdout and "crop 32 after resize 32" in \
        table.stdout, table.stdout
    assert f"| ResNet-18 | N2UQ \\* (10 classes) | {evaluated.rstrip('%')} | — | — |" in table.stdout


def _du(path: Path) -> str:
    return subprocess.run(["du", "-h", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


@pytest.mark.slow
def test_train_flags_after_double_dash_name_the_run_as_train_py_does(tmp_path):
    """``-- --method dorefa``: the run, its evaluation and logs are found in the folder train.py names
    for that method; the integer export, which covers N2UQ only, is skipped with one line."""
    source = tmp_path / "idx"
    source.mkdir()
    _write_idx(source, "train", 13, 0)
    _write_idx(source, "val", 3, 1)
    args = ["--env", "active", "--epochs", "2", "--train-per-class", "13", "--val-per-class", "3", "--",
            "--method", "dorefa"]
    proc = run_demo(args, tmp_path, source=source)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("N2UQ demo: W2A2 resnet18, DoReFa-Net, on Fashion-MNIST")
    assert "\nW2A2 resnet18, DoReFa-Net, Fashion-MNIST 130 train / 30 val images, 2 epochs: top-1 " in proc.stdout
    run = "resnet18_dorefa_2bit_quantize_downsample_False"
    assert (tmp_path / "models" / "demo" / "fashion_mnist_13x3_2ep" / run / "model_best.pth.tar").is_file()
    assert f"scripts/evaluate.py on models/demo/fashion_mnist_13x3_2ep/{run}/model_best.pth.tar" in proc.stdout
    assert "export: skipped (integer export covers N2UQ models and their ablations, not --method dorefa)" in proc.stdout
    assert "  exports      none" in proc.stdout and proc.stderr == ""
