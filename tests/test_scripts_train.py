"""The command-line faces: run.sh end to end, evaluate.py (also under a 2-process torchrun), and
one clear line with a non-zero exit for each bad input the training issue lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from n2uq.checkpoint import read_checkpoint
from n2uq.metrics import read_metrics
from resnet import train as resnet_train
from tests.conftest import REPO_ROOT

RUN = "resnet18_2bit_quantize_downsample_False"
TINY = ["--epochs", "2", "--epochs_per_run", "1", "--batch_size", "4", "--image_size", "16", "--val_resize", "16",
        "--teacher", "none", "-j", "0", "--no_progress"]


def _run(cmd, env, cwd, timeout=300):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tiny_imagefolder, tmp_path_factory):
    """One epoch through resnet/run.sh, initialised from a torchvision-layout file."""
    work = tmp_path_factory.mktemp("runsh")
    tv_file = work / "tv_resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tv_file)
    env = dict(os.environ, DATA=str(tiny_imagefolder), PYTHON=sys.executable)
    proc = _run(["bash", str(REPO_ROOT / "resnet" / "run.sh"), "resnet18", "2", "0", *TINY,
                 "--pretrained", str(tv_file), "--save", str(work / "models")], env, work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work, proc.stdout, env


def test_run_sh_trains_and_evaluates_one_epoch(trained):
    work, out, _ = trained
    run = work / "models" / RUN
    ckpt = read_checkpoint(run / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 0 and ckpt["config"]["num_classes"] == 3
    epoch = read_metrics(str(run / "metrics.jsonl"), "epoch")[-1]
    assert epoch["val"]["count"] == 7 and epoch["train"]["images"] == 12
    log = (work / "log" / f"{RUN}.txt").read_text()
    assert "epoch 1/2" in log and "val top-1" in log
    # --pretrained report: what was loaded and what was left at init
    assert "pretrained init from" in out and "left at init" in out and "*.a x" in out
    report = json.loads((run / "pretrained_report.json").read_text())
    assert "layer1.0.conv1.weight" in report["loaded"] and "layer1.0.quan1.a" in report["left_at_init"]


def _evaluate(cmd_prefix, ckpt, data, env, cwd):
    proc = _run([*cmd_prefix, str(REPO_ROOT / "scripts" / "evaluate.py"), "--checkpoint", str(ckpt),
                 "--data", str(data), "--batch_size", "4", "-j", "0", "--json"], env, cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout  # printed once, by rank 0
    return json.loads(lines[0])


def test_evaluate_reproduces_logged_top1_single_and_two_process(trained, tiny_imagefolder):
    work, _, env = trained
    ckpt = work / "models" / RUN / "checkpoint.pth.tar"
    logged = read_metrics(str(work / "models" / RUN / "metrics.jsonl"), "epoch")[-1]["val"]
    single = _evaluate([sys.executable], ckpt, tiny_imagefolder, env, work)
    assert single["config"] == "resnet18_w2a2_qd0"
    assert single["count"] == logged["count"] == 7
    assert single["top1"] == pytest.approx(logged["top1"]) and single["top5"] == pytest.approx(logged["top5"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = _evaluate(torchrun, ckpt, tiny_imagefolder, env, work)
    assert double["count"] == 7  # 4 + 3: nothing padded, nothing dropped
    assert double["top1"] == pytest.approx(single["top1"]) and double["top5"] == pytest.approx(single["top5"])


def test_mobilenetv2_run_sh_trains_and_evaluate_agrees(tiny_imagefolder, tmp_path):
    """The MobileNetV2 face of the same engine: one epoch through mobilenetv2/run.sh (W4A4, PACT
    first layer), its log under log/, and evaluate.py reading the checkpoint without being told."""
    env = dict(os.environ, DATA=str(tiny_imagefolder), PYTHON=sys.executable)
    proc = _run(["bash", str(REPO_ROOT / "mobilenetv2" / "run.sh"), *TINY, "--pretrained", "none",
                 "--save", str(tmp_path / "models")], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "models" / "mobilenetv2_4bit"
    logged = read_metrics(str(run / "metrics.jsonl"), "epoch")[-1]["val"]
    assert logged["count"] == 7
    assert "epoch 1/2" in (tmp_path / "log" / "mobilenetv2_4bit.txt").read_text()
    result = _evaluate([sys.executable], run / "model_best.pth.tar", tiny_imagefolder, env, tmp_path)
    assert result["config"] == "mobilenetv2_w4a4"
    assert result["top1"] == pytest.approx(logged["top1"]) and result["top5"] == pytest.approx(logged["top5"])


def test_full_precision_baseline_trains_and_evaluates(tiny_imagefolder, tmp_path):
    """--full_precision trains torchvision's ResNet-18; evaluate.py recognises that state dict (every
    key and shape) and reproduces the logged top-1."""
    env = dict(os.environ, DATA=str(tiny_imagefolder), PYTHON=sys.executable)
    proc = _run(["bash", str(REPO_ROOT / "resnet" / "run.sh"), "resnet18", "2", "0", *TINY, "--pretrained", "none",
                 "--full_precision", "--save", str(tmp_path / "models")], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "models" / "resnet18_fp"
    logged = read_metrics(str(run / "metrics.jsonl"), "epoch")[-1]["val"]
    result = _evaluate([sys.executable], run / "model_best.pth.tar", tiny_imagefolder, env, tmp_path)
    assert result["config"] == "resnet18_fp" and result["count"] == 7
    assert result["top1"] == pytest.approx(logged["top1"]) and result["top5"] == pytest.approx(logged["top5"])


def test_two_process_training_counts_every_val_image(tiny_imagefolder, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO_ROOT / "resnet" / "train.py"), "--data", str(tiny_imagefolder), *TINY, "--pretrained",
           "none", "--quantize_downsample", "False", "--save", str(tmp_path)]
    proc = _run(cmd, env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = read_metrics(str(tmp_path / RUN / "metrics.jsonl"), "epoch")[-1]
    assert rec["val"]["count"] == 7 and rec["train"]["images"] == 12
    single = _evaluate([sys.executable], tmp_path / RUN / "checkpoint.pth.tar", tiny_imagefolder, env, tmp_path)
    assert single["top1"] == pytest.approx(rec["val"]["top1"])


def _fails(argv, capsys, code=2):
    from n2uq.cli import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(resnet_train.main, argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == code, err
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_give_one_line_and_nonzero_exit(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    data = ["--data", str(tiny_imagefolder)]
    assert "data directory not found" in _fails(["--data", str(tmp_path / "nope")], capsys)
    assert "has no train/ folder" in _fails(["--data", str(tmp_path)], capsys)
    assert "invalid choice: 'resnet19'" in _fails([*data, "--student", "resnet19"], capsys)
    assert "bits must be in 1..8" in _fails([*data, "--n_bit", "9"], capsys)
    assert "bits must be in 1..8" in _fails([*data, "--n_bit", "0"], capsys)
    assert "expected 0, 1, True or False" in _fails([*data, "--quantize_downsample", "2"], capsys)
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "not divisible by the 3 processes" in _fails([*data, "--batch_size", "64", "--check_only"], capsys)
    monkeypatch.delenv("WORLD_SIZE")
    missing = str(tmp_path / "teacher.pth")
    msg = _fails([*data, *TINY, "--teacher", "resnet18", "--teacher_weights", missing, "--pretrained", "none",
                  "--save", str(tmp_path / "m")], capsys, code=1)
    assert "--teacher_weights file not found" in msg
    msg = _fails([*data, *TINY, "--teacher", "resnet18", "--teacher_weights", "imagenet", "--pretrained", "none",
                  "--save", str(tmp_path / "m")], capsys, code=1)
    assert "1000 outputs but the data has 3 classes" in msg


def test_run_sh_rejects_bad_arguments_before_starting(tmp_path):
    env = dict(os.environ, DATA=str(tmp_path / "none"), PYTHON=sys.executable)
    script = str(REPO_ROOT / "resnet" / "run.sh")
    for args, text in ((["resnet19", "2", "0"], "unknown ARCH"), (["resnet18", "9", "0"], "BITS must be"),
                       (["resnet18", "2", "yes"], "QD must be"), (["resnet18", "2", "0"], "data directory not found")):
        proc = _run(["bash", script, *args], env, tmp_path, timeout=60)
        assert proc.returncode == 2 and text in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_defaults_follow_the_reference_scripts(tiny_imagefolder, monkeypatch):
    """Without --quantize_downsample the ResNet is fully quantized (the reference's default True) and
    initialised from the authors' file; --full_precision turns it off; MobileNetV2 also resumes runs
    the reference's script wrote directly into --save."""
    from mobilenetv2 import train as mobilenet_train
    from n2uq import engine

    seen = []
    monkeypatch.setattr(engine, "fit", lambda build, args, **kw: seen.append((args, kw)))
    data = ["--data", str(tiny_imagefolder)]
    for argv in (data, [*data, "--full_precision"], [*data, "--quantize_downsample", "false"]):
        assert resnet_train.main(argv) == 0
    (default, d_kw), (fp, fp_kw), (off, off_kw) = seen
    assert default.quantize_downsample is True and default.pretrained == "authors"
    assert d_kw["run_name"] == "resnet18_2bit_quantize_downsample_True"
    assert (default.batch_size, default.epochs, default.learning_rate) == (256, 128, 1.25e-3)  # the paper's run.sh
    assert fp.quantize_downsample is False and fp_kw["run_name"] == "resnet18_fp" and fp.pretrained == "torchvision"
    assert off.quantize_downsample is False and off_kw["run_name"] == RUN
    assert mobilenet_train.main(data) == 0
    assert seen[-1][1]["run_name"] == "mobilenetv2_4bit" and seen[-1][1]["reference_run_dir"] == "."
