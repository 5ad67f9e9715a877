"""What the tables set beside the paper's numbers: the full-lr-threshold variant in a row of its own,
full-precision files and runs skipped with a line, runs validated on other images left out, and
evaluation under any number of processes."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torchvision

from n2uq.checkpoint import ModelConfig, load_model_state
from n2uq.distributed import DistEnv
from n2uq.methods import Quantizers
from n2uq.tables import cell_of
from n2uq.train_state import run_name
from scripts import evaluate, reproduce_tables
from scripts.model_zoo import build_model
from tests.conftest import make_image_folder

CLASSES = 3
NAMES = [f"class_{k}" for k in range(CLASSES)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tables_runs") / "data", classes=CLASSES, train_per_class=1,
                             val_per_class=2, size=16)


def _save(state_dict, path, data, config=None, **args):
    """A checkpoint as this project's training writes it (its arguments, classes and model config)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "classes": NAMES, "config": config or {},
                "args": {"data": str(data), "image_size": 16, "val_resize": 16, **args}, "val_top1": 12.0}, path)


def _metrics(run_dir, count):
    (run_dir / "metrics.jsonl").write_text(json.dumps({"event": "epoch", "epoch": 0,
                                                       "val": {"top1": 50.0, "top5": 100.0, "count": count}}) + "\n")


def _tables(argv, capsys):
    code = reproduce_tables.main([*argv, "--workers", "0", "--batch_size", "4"])
    return code, *capsys.readouterr()


def test_full_lr_threshold_models_have_their_own_tag_row_and_folder(data, tmp_path, capsys):
    """--full_lr_thresholds departs from the reference: its file is not labelled (nor tabulated as) plain N2UQ,
    and its tag is the one of the run folder train.py wrote it to."""
    quantizers = Quantizers(2, full_lr_thresholds=True)
    path = tmp_path / "models" / "x.pth.tar"
    _save(build_model(ModelConfig("resnet18", 2, False, CLASSES)).state_dict(), path, data,
          {"arch": "resnet18", "n_bit": 2, "quantizers": quantizers.as_dict()}, full_lr_thresholds=True)
    config = load_model_state(path)[1]
    assert config.tag == "resnet18_n2uq-full-lr-thresholds_w2a2_qd0"
    assert run_name("resnet18", 2, False, config.method_tag) == run_name("resnet18", 2, False, quantizers.tag)
    assert cell_of(config)[1] == "n2uq-full-lr-thresholds"
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(path), "--data", str(data), "--json", "-j", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == config.tag
    code, out, err = _tables(["--models", str(tmp_path / "models"), "--data", str(data), "--out",
                              str(tmp_path / "out")], capsys)
    assert code == 0, err
    with open(tmp_path / "out" / "tables.csv") as f:
        measured = [r["method"] for r in csv.DictReader(f) if r["measured_top1"]]
    assert measured == [f"n2uq-full-lr-thresholds ({CLASSES} classes)"]


def test_full_precision_files_and_runs_are_skipped_with_a_line(data, tmp_path, capsys):
    """A --full_precision run in the models folder (where train.py puts it) is no error."""
    run = tmp_path / "models" / "resnet18_fp"
    state = torchvision.models.resnet18(num_classes=CLASSES).state_dict()
    _save({f"module.{k}": v for k, v in state.items()}, run / "checkpoint.pth.tar", data,
          {"arch": "resnet18", "full_precision": True}, full_precision=True)
    _metrics(run, 6)
    models = str(tmp_path / "models")
    code, out, err = _tables(["--models", models, "--runs", models, "--data", str(data), "--out",
                              str(tmp_path / "out")], capsys)
    assert code == 0 and err == "", err
    assert f"{run / 'checkpoint.pth.tar'}: skipped: a full-precision model" in out
    assert f"{run}: skipped: a full-precision model" in out


def test_runs_validated_on_other_images_are_left_out(data, tmp_path, capsys):
    """A run's own top-1 is tabulated under --data only when it was measured on that val/ folder."""
    state = build_model(ModelConfig("resnet18", 2, False, CLASSES)).state_dict()
    runs = tmp_path / "runs"
    for name, recorded, count in (("same", data, 6), ("other", tmp_path / "elsewhere", 6), ("smaller", data, 30)):
        _save(state, runs / name / "checkpoint.pth.tar", recorded)
        _metrics(runs / name, count)
    found, errors, skipped = reproduce_tables.run_measurements(str(runs), str(data), NAMES, 6)
    assert [m.source for m in found] == [str(runs / "same")] and errors == []
    assert skipped == [f"{runs / 'other'}: skipped: trained and validated on {tmp_path / 'elsewhere'}, not on "
                       f"--data {data}", f"{runs / 'smaller'}: skipped: validated on 30 images, {data}/val holds 6"]
    found, errors, skipped = reproduce_tables.run_measurements(str(runs), str(data), NAMES[::-1], 6)
    assert found == [] and len(skipped) == 3 and "other class folders" in skipped[1]
    torch.save({"state_dict": state}, runs / "same" / "checkpoint.pth.tar")  # records no data: cannot tell
    assert "records no data folder" in reproduce_tables.run_measurements(str(runs), str(data), NAMES, 6)[1][0]


def test_evaluate_split_train_shows_no_val_number(data, capsys):
    path = data.parent / "fp.pth.tar"
    _save(torchvision.models.resnet18(num_classes=CLASSES).state_dict(), path, data)
    for split, shown in (("train", False), ("val", True)):
        assert evaluate.main(["--checkpoint", str(path), "--data", str(data), "--split", split, "-j", "0"]) == 0
        assert ("training logged 12.00%" in capsys.readouterr().out) is shown


@pytest.mark.parametrize("world_size, batch, per_rank", [(1, 256, 256), (3, 256, 86), (3, 2, 1), (8, 256, 32)])
def test_evaluation_batch_needs_no_divisibility(world_size, batch, per_rank):
    env = DistEnv(0, world_size, 0, world_size, torch.device("cpu"))
    assert env.eval_batch(batch) == per_rank
