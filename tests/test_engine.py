"""The engine end to end, in process: exact resume, the lr of every group at every epoch, logs."""

from __future__ import annotations

import json

import pytest
import torch

from n2uq.checkpoint import read_checkpoint
from n2uq.metrics import read_metrics
from n2uq.recipe import lr_at_epoch
from resnet import train as resnet_train

RUN = "resnet18_2bit_quantize_downsample_False"
BASE_LR = 2e-3


def _train(data, save, *extra):
    argv = ["--data", str(data), "--save", str(save), "--epochs", "2", "--quantize_downsample", "False",
            "--batch_size", "6", "--image_size", "16", "--val_resize", "16", "--teacher", "none",
            "--pretrained", "none", "--learning_rate", str(BASE_LR), "-j", "0", "--no_progress", "--seed", "3", *extra]
    assert resnet_train.main(argv) == 0
    return save / RUN


@pytest.fixture(scope="module")
def uninterrupted(tiny_imagefolder, tmp_path_factory):
    return _train(tiny_imagefolder, tmp_path_factory.mktemp("full"))


def test_resumed_run_equals_uninterrupted(tiny_imagefolder, tmp_path, uninterrupted):
    """Stop after epoch 1, resume (with a loader worker this time): final state bit-identical."""
    run = _train(tiny_imagefolder, tmp_path, "--epochs_per_run", "1")
    first = read_checkpoint(run / "checkpoint.pth.tar")
    assert (first["epoch"], first["next_epoch"]) == (0, 1)
    _train(tiny_imagefolder, tmp_path, "-j", "1")

    a = read_checkpoint(uninterrupted / "checkpoint.pth.tar")
    b = read_checkpoint(run / "checkpoint.pth.tar")
    assert a["epoch"] == b["epoch"] == 1
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][pid][name]))
    assert a["scheduler"] == b["scheduler"]
    assert a["best_top1_acc"] == b["best_top1_acc"]
    starts = read_metrics(str(run / "metrics.jsonl"), "start")
    assert [s["next_epoch"] for s in starts] == [0, 1]


def test_lr_of_every_group_at_every_epoch(uninterrupted):
    """SPEC §6: epoch e runs at lr·(1 - (e+1)/epochs); the alpha group at a tenth of that."""
    epochs = read_metrics(str(uninterrupted / "metrics.jsonl"), "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1]
    for rec in epochs:
        expected = lr_at_epoch(BASE_LR, rec["epoch"], 2)
        assert expected == BASE_LR * (0.5 if rec["epoch"] == 0 else 0.0)
        assert rec["lr"]["other"] == pytest.approx(expected, abs=1e-12)
        assert rec["lr"]["weights"] == pytest.approx(expected, abs=1e-12)
        assert rec["lr"]["alpha"] == pytest.approx(expected / 10, abs=1e-12)


def test_checkpoint_layout_and_logs(uninterrupted):
    ckpt = read_checkpoint(uninterrupted / "checkpoint.pth.tar")
    for key in ("epoch", "state_dict", "best_top1_acc", "optimizer", "scheduler", "scaler", "rng", "args"):
        assert key in ckpt
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    assert ckpt["config"] == {"arch": "resnet18", "n_bit": 2, "quantize_downsample": False, "num_classes": 3,
                              "method": "n2uq", "quantizers": {"n_bit": 2, "method": "n2uq", "learned_thresholds": True,
                                                               "entropy_preserving": True,
                                                               "full_lr_thresholds": False}}
    assert (uninterrupted / "model_best.pth.tar").is_file()
    assert not [p for p in uninterrupted.iterdir() if p.name.endswith(".tmp")]
    records = read_metrics(str(uninterrupted / "metrics.jsonl"), "epoch")
    assert all(r["val"]["count"] == 7 for r in records)
    assert records[-1]["val"]["top1"] == pytest.approx(ckpt["val_top1"])
    assert ckpt["best_top1_acc"] == pytest.approx(max(r["val"]["top1"] for r in records))
    assert list((uninterrupted / "tb").iterdir()), "no TensorBoard event file"
    json.dumps(ckpt["args"])  # plain values only


def _assert_same_weights(run_a, run_b):
    a = read_checkpoint(run_a / "checkpoint.pth.tar")
    b = read_checkpoint(run_b / "checkpoint.pth.tar")
    assert (a["next_epoch"], a["step_in_epoch"]) == (b["next_epoch"], b["step_in_epoch"]) == (2, 0)
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_mid_epoch_stops_resume_exactly(tiny_imagefolder, tmp_path, uninterrupted):
    """One optimizer step per invocation (mid-epoch checkpoints): same final weights."""
    positions = []
    for _ in range(4):
        run = _train(tiny_imagefolder, tmp_path, "--steps_per_run", "1")
        ckpt = read_checkpoint(run / "checkpoint.pth.tar")
        positions.append((ckpt["next_epoch"], ckpt["step_in_epoch"]))
    assert positions == [(0, 1), (1, 0), (1, 1), (2, 0)]
    _assert_same_weights(uninterrupted, run)
    # each epoch was resumed after its first step: its train numbers still cover the whole epoch, the
    # running sums carried by the mid-epoch checkpoint (one process: the very same float64 sums)
    whole, resumed = (_train_numbers(r / "metrics.jsonl") for r in (uninterrupted, run))
    assert resumed == whole and all(n["images"] == 12 and n["from_step"] == 0 for n in resumed)


def _train_numbers(metrics):
    return [{k: r["train"][k] for k in ("loss", "top1", "top5", "images", "from_step")}
            for r in read_metrics(str(metrics), "epoch")]


def test_resume_of_a_checkpoint_without_train_sums_says_what_the_numbers_cover(tiny_imagefolder, tmp_path,
                                                                              capsys):
    """A mid-epoch checkpoint written before the sums were recorded: the resumed epoch's line says its
    train numbers cover only the steps after the resume."""
    run = _train(tiny_imagefolder, tmp_path, "--steps_per_run", "1")
    ckpt = read_checkpoint(run / "checkpoint.pth.tar")
    assert (ckpt["step_in_epoch"], sorted(ckpt["train_sums"])) == (1, ["images", "loss_sum", "time_s", "top1_hits",
                                                                       "top5_hits"])
    assert ckpt["train_sums"]["images"] == 6
    del ckpt["train_sums"]
    torch.save(ckpt, run / "checkpoint.pth.tar")
    capsys.readouterr()
    _train(tiny_imagefolder, tmp_path, "--epochs_per_run", "1")
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch 1/2"))
    assert "(steps 2-2 only: the checkpoint resumed from holds no sums of the steps before)" in line
    numbers = _train_numbers(run / "metrics.jsonl")
    assert numbers[-1]["images"] == 6 and numbers[-1]["from_step"] == 1


def test_sigterm_saves_and_the_next_run_resumes(tiny_imagefolder, tmp_path, uninterrupted, monkeypatch):
    import os
    import signal

    from n2uq import loop

    calls = []
    real_loss = loop.label_smooth_ce

    def loss_that_gets_terminated(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, during the first step
        return real_loss(*a, **k)

    monkeypatch.setattr(loop, "label_smooth_ce", loss_that_gets_terminated)
    run = _train(tiny_imagefolder, tmp_path)
    ckpt = read_checkpoint(run / "checkpoint.pth.tar")
    assert (ckpt["next_epoch"], ckpt["step_in_epoch"]) == (0, 1) and len(calls) == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    monkeypatch.setattr(loop, "label_smooth_ce", real_loss)
    _train(tiny_imagefolder, tmp_path)
    _assert_same_weights(uninterrupted, run)


def test_kd_from_a_frozen_teacher(tiny_imagefolder, tmp_path, monkeypatch):
    """--teacher resnet18 --teacher_weights FILE: every step's loss is the KD loss against that
    teacher's logits, and the teacher (eval mode, no gradients) ends exactly as loaded, BatchNorm
    statistics included."""
    import torchvision

    import n2uq.loop as loop
    import n2uq.trainer as trainer

    teacher_file = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=3)
    with torch.no_grad():
        for buf in reference.buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)  # running stats a training-mode forward would change
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, teacher_file)

    seen = {"teachers": [], "kd_calls": 0}
    real_kd, real_epoch = loop.kd_loss, trainer.train_one_epoch

    def kd_spy(student_logits, teacher_logits):
        seen["kd_calls"] += 1
        assert not teacher_logits.requires_grad
        return real_kd(student_logits, teacher_logits)

    def epoch_spy(parts, *args, **kwargs):
        seen["teachers"].append(parts.teacher)
        return real_epoch(parts, *args, **kwargs)

    monkeypatch.setattr(loop, "kd_loss", kd_spy)
    monkeypatch.setattr(trainer, "train_one_epoch", epoch_spy)
    _train(tiny_imagefolder, tmp_path / "kd", "--teacher", "resnet18", "--teacher_weights", str(teacher_file))

    assert len(seen["teachers"]) == 2 and seen["kd_calls"] == 4  # 2 epochs × 12 images / batch 6
    teacher = seen["teachers"][0]
    assert teacher is seen["teachers"][1] and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    for key, value in reference.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key


def test_a_quantized_mobilenetv2_from_random_init_is_warned_about(capsys, tmp_path):
    """Its quantized convolutions start at weights ~1e-3: every code is 0 and it cannot learn."""
    from types import SimpleNamespace

    from n2uq import engine
    from n2uq.distributed import DistEnv

    cfg = SimpleNamespace(student=SimpleNamespace(pretrained="none", models_dir="models"),
                          run=SimpleNamespace(save="x"))
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    for config, warned in (({"arch": "mobilenetv2"}, True), ({"arch": "mobilenetv2", "full_precision": True}, False),
                           ({"arch": "resnet18"}, False)):
        engine._initialise(torch.nn.Linear(2, 2), cfg, config, str(tmp_path), env)
        assert ("a quantized MobileNetV2 from random init does not learn" in capsys.readouterr().out) == warned
