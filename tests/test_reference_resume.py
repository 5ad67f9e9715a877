"""Resuming a checkpoint written by the reference's training script (and every released
``model_best.pth.tar``): weights, epoch, best top-1, the Adam state mapped past the reference's
frozen constants, and the learning-rate schedule replayed. Files are built as that script builds
them (``tests/reference_training_file.py``)."""

from __future__ import annotations

import pytest
import torch

from mobilenetv2 import train as mobilenet_train
from mobilenetv2.mobilenet_v2 import MobileNetV2
from n2uq.cli import run_main
from n2uq.metrics import read_metrics
from n2uq.recipe import (
    MOBILENETV2_ALPHA_PATTERNS,
    RESNET_ALPHA_PATTERNS,
    build_optimizer,
    build_scheduler,
    lr_at_epoch,
    scheduler_step,
)
from n2uq.resume import read_training_checkpoint, restore_training
from n2uq.train_state import TrainingParts
from resnet import train as resnet_train
from resnet.resnet import resnet18, resnet50
from tests.reference_training_file import write_reference_checkpoint

LR, EPOCHS = 2e-3, 8

CONFIGS = {
    "resnet18_qd0": (lambda: resnet18(2, False, 10), RESNET_ALPHA_PATTERNS),
    "resnet18_qd1": (lambda: resnet18(2, True, 10), RESNET_ALPHA_PATTERNS),
    "resnet50_qd0": (lambda: resnet50(3, False, 10), RESNET_ALPHA_PATTERNS),
    "resnet50_qd1": (lambda: resnet50(3, True, 10), RESNET_ALPHA_PATTERNS),
    "mobilenetv2": (lambda: MobileNetV2(4, 10), MOBILENETV2_ALPHA_PATTERNS),
}


def _fresh_parts(build, patterns, all_ltq=False):
    torch.manual_seed(123)  # another init than the saved model's
    model = build()
    optimizer = build_optimizer(model, LR, 0.0, alpha_patterns=patterns, all_ltq_a=all_ltq)
    return TrainingParts(model, optimizer, build_scheduler(optimizer, EPOCHS))


@pytest.mark.parametrize("label", list(CONFIGS))
def test_reference_adam_state_maps_onto_this_runs_groups(label, tmp_path):
    build, patterns = CONFIGS[label]
    saved = write_reference_checkpoint(build(), tmp_path / "checkpoint.pth.tar", patterns, epoch=2,
                                       best_top1=61.25, lr=LR, epochs=EPOCHS)
    assert len(saved["optimizer"]["param_groups"]) == 3
    parts = _fresh_parts(build, patterns)
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        parts.optimizer.load_state_dict(saved["optimizer"])  # what resuming such a file used to do

    ckpt = read_training_checkpoint(str(tmp_path / "checkpoint.pth.tar"))
    progress, notes = restore_training(parts, ckpt, "FILE", patterns)
    assert (progress.next_epoch, progress.step_in_epoch, progress.best_top1) == (3, 0, 61.25)
    assert len(notes) == 1 and "Adam state of" in notes[0] and "frozen constant(s)" in notes[0]
    for key, value in parts.model.state_dict().items():
        assert torch.equal(value, saved["state_dict"][f"module.{key}"]), key

    saved_state = {saved["index_names"][i]: s for i, s in saved["optimizer"]["state"].items()}
    own = dict(parts.model.named_parameters())
    restored = {name: parts.optimizer.state[p] for name, p in own.items() if p in parts.optimizer.state}
    assert restored.keys() == saved_state.keys() and len(restored) == sum(p.requires_grad for p in own.values())
    for name, state in restored.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], saved_state[name][key]), (name, key)
    assert f"Adam state of {len(restored)} parameter(s)" in notes[0]

    scheduler_step(parts.scheduler)  # the start of the resumed epoch, epoch 3
    lrs = {g["name"]: g["lr"] for g in parts.optimizer.param_groups}
    assert lrs["other"] == pytest.approx(lr_at_epoch(LR, 3, EPOCHS)) == pytest.approx(LR * (1 - 4 / EPOCHS))
    assert lrs["weights"] == pytest.approx(lrs["other"]) and lrs["alpha"] == pytest.approx(lrs["other"] / 10)


def test_adam_state_that_does_not_correspond_is_skipped_with_one_line(tmp_path):
    build, patterns = CONFIGS["resnet50_qd1"]
    saved = write_reference_checkpoint(build(), tmp_path / "ckpt.pth.tar", patterns, epoch=0, lr=LR, epochs=EPOCHS)
    saved["optimizer"]["param_groups"][1]["params"].pop()  # another model's optimizer: one parameter fewer
    torch.save(saved, tmp_path / "ckpt.pth.tar")
    parts = _fresh_parts(build, patterns)
    progress, notes = restore_training(parts, read_training_checkpoint(str(tmp_path / "ckpt.pth.tar")), "F", patterns)
    assert progress.next_epoch == 1 and not parts.optimizer.state
    assert len(notes) == 1 and notes[0].startswith("checkpoint of the reference's format: Adam state not restored (")
    assert "Adam starts afresh" in notes[0]


def test_all_ltq_alpha_group_still_gets_the_state_by_name(tmp_path):
    """--alpha_group all_ltq groups ResNet-50's quan3.a differently; the state follows the names."""
    build, patterns = CONFIGS["resnet50_qd1"]
    saved = write_reference_checkpoint(build(), tmp_path / "c.pth.tar", patterns, epoch=0, lr=LR, epochs=EPOCHS)
    parts = _fresh_parts(build, patterns, all_ltq=True)
    restore_training(parts, read_training_checkpoint(str(tmp_path / "c.pth.tar")), "F", patterns)
    a = parts.model.layer1[0].quan3.a
    index = saved["index_names"].index("layer1.0.quan3.a")
    assert torch.equal(parts.optimizer.state[a]["exp_avg"], saved["optimizer"]["state"][index]["exp_avg"])


def _tiny(data, save, *extra):
    return ["--data", str(data), "--save", str(save), "--batch_size", "4", "--image_size", "16", "--val_resize",
            "16", "--teacher", "none", "--pretrained", "none", "-j", "0", "--no_progress",
            "--learning_rate", str(LR), *extra]


def test_resume_auto_continues_a_reference_run(tiny_imagefolder, tmp_path, capsys):
    """ResNet-18 W2A2 with quantized downsample (the reference's default): its run folder holds the
    reference's checkpoint of epoch 2 of 4; the resumed epoch 3 trains at lr/4 with Adam going on."""
    run = tmp_path / "resnet18_2bit_quantize_downsample_True"
    run.mkdir()
    write_reference_checkpoint(resnet18(2, True, 3), run / "checkpoint.pth.tar", RESNET_ALPHA_PATTERNS, epoch=1,
                               best_top1=99.5, lr=LR, epochs=4, image_size=16)
    assert resnet_train.main(_tiny(tiny_imagefolder, tmp_path, "--epochs", "4", "--epochs_per_run", "1")) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoint.pth.tar'}: next epoch 3, best top-1 99.50" in out
    assert "checkpoint of the reference's format: Adam state of" in out
    record = read_metrics(str(run / "metrics.jsonl"), "epoch")[-1]
    assert record["epoch"] == 2
    assert record["lr"]["other"] == pytest.approx(LR * (1 - 3 / 4)) == pytest.approx(lr_at_epoch(LR, 2, 4))
    assert record["lr"]["alpha"] == pytest.approx(LR / 40)
    ckpt = read_training_checkpoint(str(run / "checkpoint.pth.tar"))
    assert (ckpt["epoch"], ckpt["next_epoch"]) == (2, 3)
    assert ckpt["best_top1_acc"] == max(99.5, record["val"]["top1"])
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {1 + 3}  # Adam went on: the saved step, then 12 images / batch 4


def test_mobilenetv2_run_of_the_reference_script_is_resumed_where_it_is(tiny_imagefolder, tmp_path, capsys):
    """The reference's MobileNetV2 script writes directly into --save: --resume auto finds it there."""
    write_reference_checkpoint(MobileNetV2(4, 3), tmp_path / "checkpoint.pth.tar", MOBILENETV2_ALPHA_PATTERNS,
                               epoch=0, best_top1=10.0, lr=LR, epochs=4, image_size=16)
    assert mobilenet_train.main(_tiny(tiny_imagefolder, tmp_path, "--epochs", "4", "--epochs_per_run", "1")) == 0
    out = capsys.readouterr().out
    assert f"no checkpoint in {tmp_path / 'mobilenetv2_4bit'}; the run's checkpoint is in {tmp_path}" in out
    assert f"resumed from {tmp_path / 'checkpoint.pth.tar'}: next epoch 2" in out
    ckpt = read_training_checkpoint(str(tmp_path / "checkpoint.pth.tar"))
    assert (ckpt["epoch"], ckpt["config"]["arch"]) == (1, "mobilenetv2")
    assert not (tmp_path / "mobilenetv2_4bit" / "checkpoint.pth.tar").exists()
    record = read_metrics(str(tmp_path / "metrics.jsonl"), "epoch")[-1]
    assert record["epoch"] == 1 and record["lr"]["other"] == pytest.approx(LR / 2)


@pytest.mark.parametrize("label, saved_model, message", [
    ("bits", lambda: resnet18(4, False, 3), "holds another model (n_bit 4 vs 2: checkpoint vs this run)"),
    ("downsample", lambda: resnet18(2, True, 3),
     "holds another model (quantize_downsample True vs False: checkpoint vs this run)"),
    ("arch", lambda: MobileNetV2(4, 3), "holds another model (arch mobilenetv2 vs resnet18"),
])
def test_a_reference_file_of_another_model_is_one_line(label, saved_model, message, tiny_imagefolder, tmp_path,
                                                         capsys):
    path = tmp_path / "other.pth.tar"
    patterns = MOBILENETV2_ALPHA_PATTERNS if label == "arch" else RESNET_ALPHA_PATTERNS
    write_reference_checkpoint(saved_model(), path, patterns, epoch=0, image_size=16)
    argv = _tiny(tiny_imagefolder, tmp_path, "--epochs", "4", "--quantize_downsample", "False", "--resume", str(path))
    with pytest.raises(SystemExit) as exc:
        run_main(resnet_train.main, argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "resnet18_2bit_quantize_downsample_False" / "checkpoint.pth.tar").exists()
