"""The command-line faces: run.sh end to end, evaluate.py (also under a 3-process torchrun), and
one clear line with a non-zero exit for each bad input the training issue lists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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
    # 3 processes, --batch_size 4 (not a multiple of 3): each evaluates its shard with batches of 2
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    double = _evaluate(torchrun, ckpt, tiny_imagefolder, env, work)
    assert double["count"] == 7  # 3 + 2 + 2: nothing padded, nothing dropped
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
    assert "bits must be an integer in 1..8" in _fails([*data, "--n_bit", "9"], capsys)
    assert "bits must be an integer in 1..8" in _fails([*data, "--n_bit", "0"], capsys)
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
    monkeypatch.setattr(engine, "fit", lambda build, cfg, **kw: seen.append((cfg, kw)))
    data = ["--data", str(tiny_imagefolder)]
    for argv in (data, [*data, "--full_precision"], [*data, "--quantize_downsample", "false"]):
        assert resnet_train.main(argv) == 0
    (default, d_kw), (fp, fp_kw), (off, off_kw) = seen
    assert default.student.quantize_downsample is True and default.student.pretrained == "authors"
    assert d_kw["run_name"] == "resnet18_2bit_quantize_downsample_True"
    assert (default.data.batch_size, default.optim.epochs, default.optim.learning_rate) == (256, 128, 1.25e-3)
    assert fp.student.quantize_downsample is False and fp_kw["run_name"] == "resnet18_fp"
    assert fp.student.pretrained == "torchvision"
    assert off.student.quantize_downsample is False and off_kw["run_name"] == RUN
    assert mobilenet_train.main(data) == 0
    assert seen[-1][1]["run_name"] == "mobilenetv2_4bit" and seen[-1][1]["reference_run_dir"] == "."
    # the reference's script trains W4A4 N2UQ only: no other configuration looks for a run in --save itself
    for other in (["--n_bit", "2"], ["--method", "dorefa"]):
        assert mobilenet_train.main([*data, *other]) == 0
        assert seen[-1][1]["reference_run_dir"] is None, other


def test_ctrl_c_while_starting_exits_with_one_line(tiny_imagefolder, tmp_path):
    """SIGINT during the imports (before the training loop takes it over): ``interrupted``, exit 130."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "resnet" / "train.py"), "--data", str(tiny_imagefolder),
                             "--save", str(tmp_path), *TINY], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "interrupted\n", err


# What checkpoints recorded under 'args' before the flags were parsed into a typed configuration
# (vars of the argparse namespace, after the scripts' defaults): they must keep recording exactly this.
RECORDED_RESNET_DEFAULT = {
    "alpha_group": "reference", "amp": "none", "batch_size": 256, "channels_last": False, "check_only": False,
    "compile": False, "data": "DATA", "debug": False, "device": "auto", "epochs": 128, "epochs_per_run": 0,
    "full_precision": False, "image_size": 224, "label_smooth": 0.1, "learning_rate": 0.00125, "log_every": 50,
    "maxabs_weights": False, "method": "n2uq", "min_crop_scale": 0.08, "models_dir": "models", "momentum": 0.9,
    "n_bit": 2, "no_progress": False, "pact_alpha_decay": None, "pretrained": "authors", "quantize_downsample": True,
    "full_lr_thresholds": False,
    "resume": "auto", "save": "./models", "save_every_steps": 0, "seed": 0, "skip_bad_images": False,
    "skip_nonfinite": False, "steps_per_run": 0, "student": "resnet18", "teacher": "resnet101",
    "teacher_weights": "imagenet", "threads": 0, "uniform_thresholds": False, "val_resize": 256, "weight_decay": 0.0,
    "workers": None}


def _recorded_flags(main, argv, monkeypatch):
    from n2uq import engine

    seen = []
    monkeypatch.setattr(engine, "fit", lambda build, cfg, **kw: seen.append(cfg.flags()))
    assert main(argv) == 0
    return seen[-1]


def test_checkpoints_record_the_same_flags_as_before(tiny_imagefolder, monkeypatch):
    from mobilenetv2 import train as mobilenet_train

    data = str(tiny_imagefolder)
    expected = {**RECORDED_RESNET_DEFAULT, "data": data}
    assert _recorded_flags(resnet_train.main, ["--data", data], monkeypatch) == expected
    fp = _recorded_flags(resnet_train.main, ["--data", data, "--full_precision"], monkeypatch)
    assert fp == {**expected, "full_precision": True, "quantize_downsample": False, "pretrained": "torchvision"}
    argv = ["--data", data, "--method", "pact", "--pact_alpha_decay", "0.01", "-j", "2", "--amp", "bf16"]
    assert _recorded_flags(resnet_train.main, argv, monkeypatch) == {
        **expected, "method": "pact", "pact_alpha_decay": 0.01, "workers": 2, "amp": "bf16"}
    mobilenet = _recorded_flags(mobilenet_train.main, ["--data", data, "--method", "dorefa", "--n_bit", "3"],
                                monkeypatch)  # MobileNetV2 has no --quantize_downsample / --full_precision
    absent = ("quantize_downsample", "full_precision")
    assert mobilenet == {**{k: v for k, v in expected.items() if k not in absent}, "student": "mobilenetv2",
                         "method": "dorefa", "n_bit": 3}


def test_a_checkpoint_written_with_the_namespace_args_is_read_back(tmp_path):
    """Checkpoints written before the typed configuration store ``vars(namespace)``: their flags give
    the same configuration back, and a mid-epoch one is resumed only with the same data layout."""
    import argparse

    from n2uq.cli import UsageError
    from n2uq.resume import check_resume
    from n2uq.run_config import TrainConfig

    old_args = dict(vars(argparse.Namespace(**RECORDED_RESNET_DEFAULT)), batch_size=8, seed=3)
    cfg = TrainConfig.from_flags(old_args)
    assert cfg.flags() == old_args
    assert (cfg.data.batch_size, cfg.run.seed, cfg.student.quantize_downsample) == (8, 3, True)
    with pytest.raises(ValueError, match="not a training flag: batchsize"):
        TrainConfig.from_flags({"batchsize": 8})
    from n2uq import engine

    with pytest.raises(TypeError, match="fit takes an n2uq.run_config.TrainConfig, not Namespace"):
        engine.fit(lambda num_classes: None, argparse.Namespace(**old_args))
    config = {"arch": "resnet18", "n_bit": 2, "quantize_downsample": True, "num_classes": 3, "method": "n2uq"}
    old = {"state_dict": {}, "scheduler": {}, "config": config, "args": old_args, "next_epoch": 0,
           "step_in_epoch": 2, "world_size": 1, "train_images": 12}
    layout = {"world_size": 1, "train_images": 12}
    check_resume(old, "OLD", config, cfg.flags(), layout)
    with pytest.raises(UsageError, match=r"--batch_size 8 vs 4: checkpoint vs now"):
        check_resume(old, "OLD", config, {**cfg.flags(), "batch_size": 4}, layout)
    with pytest.raises(UsageError, match=r"--seed 3 vs 0: checkpoint vs now"):
        check_resume(old, "OLD", config, {**cfg.flags(), "seed": 0}, layout)


def test_help_describes_every_flag_once_with_one_default():
    from n2uq.cli import build_train_parser

    parser = build_train_parser(["resnet18"], "resnet18", 2)
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no description"
        shown = formatter._get_help_string(action)  # the help with the default the formatter appends
        assert shown.replace("%(default)s", "D").count("(default") <= 1, shown
        assert not ("%(default)" in shown and action.default is None), shown  # no "(default: None)"
    text = parser.format_help()
    assert "at most 8) (default" not in text and "(default: 0.0001)" in text


def test_help_imports_no_training_module():
    """--help (and --check_only) parse before the engine, the data pipeline or torchvision is imported."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO_ROOT / "resnet" / "train.py"), "--help"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--check_only" in proc.stdout, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "n2uq.cli" in imported
    for heavy in ("torchvision", "n2uq.engine", "n2uq.data", "n2uq.loop", "n2uq.teacher"):
        assert heavy not in imported, heavy


def test_check_only_says_what_it_checked_and_checks_the_teacher(tiny_imagefolder, tmp_path, capsys):
    save = tmp_path / "models"
    base = ["--data", str(tiny_imagefolder), "--save", str(save), "--quantize_downsample", "0", "--check_only"]
    assert resnet_train.main([*base, "--teacher", "none"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "checked, nothing trained or written:"
    assert "resnet18 W2A2 n2uq, quantize_downsample False" in out
    assert f"{tiny_imagefolder}: 3 classes, the same class folders in train/ and val/" in out
    assert "no teacher: label-smoothed cross-entropy (epsilon 0.1)" in out
    assert str(save / RUN) in out and not save.exists()
    # the teacher's 1000 ImageNet classes against the data's 3: found by the check, before any training
    msg = _fails([*base, "--pretrained", "none"], capsys, code=1)
    assert "--teacher_weights imagenet gives 1000 outputs but the data has 3 classes" in msg
    teacher = tmp_path / "teacher.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), teacher)
    msg = _fails([*base, "--teacher", "resnet18", "--teacher_weights", str(teacher)], capsys, code=1)
    assert "fc.weight checkpoint [10, 512] vs model [3, 512]" in msg
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), teacher)
    assert resnet_train.main([*base, "--teacher", "resnet18", "--teacher_weights", str(teacher)]) == 0
    assert f"loss: KD from resnet18 with {teacher} (3 classes)" in capsys.readouterr().out
    assert not save.exists()
