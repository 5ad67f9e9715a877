"""scripts/reproduce_tables.py on checkpoints saved in the reference's format, with a tiny val tree."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from n2uq.checkpoint import ModelConfig
from n2uq.tables import Measurement, build_table, cell_of, load_paper_results, render_markdown, row_method
from scripts import evaluate, reproduce_tables
from scripts.model_zoo import build_model
from tests.conftest import REPO_ROOT, make_image_folder
from tests.test_models import _randomise

CLASSES = 4
# File name -> configuration; the names deliberately say nothing about the contents.
CONFIGS = {
    "a.pth.tar": ModelConfig("resnet18", 2, False, CLASSES),
    "nested/b.pth": ModelConfig("resnet18", 4, True, CLASSES),
    "c.bin": ModelConfig("mobilenetv2", 4, False, CLASSES),
}


def _save_reference_format(model, path):
    torch.save({"epoch": 127, "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "best_top1_acc": torch.tensor(50.0), "optimizer": {"state": {}, "param_groups": []}}, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    data = make_image_folder(root / "data", classes=CLASSES, train_per_class=1, val_per_class=[3, 2, 2, 2], size=32)
    models = root / "models"
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = build_model(cfg)
        _randomise(model, i)
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        _save_reference_format(model, models / name)
    (models / "README.md").write_text("not a checkpoint")
    return root, data, models


def _run(args, env=None):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "reproduce_tables.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)


def _evaluate_json(path, data, capsys):
    """What ``scripts/evaluate.py --json`` prints for ``path``."""
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(path), "--data", str(data), "--image_size", "32", "--val_resize", "32",
                          "--json", "--workers", "0", "--batch_size", "4"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cells_match_evaluate_and_cache_prevents_reevaluation(setup, monkeypatch, capsys):
    root, data, models = setup
    out = root / "out"
    argv = ["--models", str(models), "--data", str(data), "--out", str(out), "--image_size", "32",
            "--val_resize", "32", "--workers", "0", "--batch_size", "4"]
    assert reproduce_tables.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| ResNet-18 | N2UQ \\* |" in printed

    rows = _csv_rows(out)
    for name, cfg in CONFIGS.items():
        # 4-class models: rows of their own, never set beside the published ImageNet number
        row = rows[_cell(cfg)]
        assert row["method"].endswith(" (4 classes)") and row["published_top1"] == row["difference"] == ""
        expected = _evaluate_json(models / name, data, capsys)
        assert expected["config"] == cfg.tag
        assert float(row["measured_top1"]) == pytest.approx(expected["top1"], abs=5e-5)  # CSV keeps 4 decimals
        assert row["source"].endswith(name) and row["preprocessing"] == "crop 32 after resize 32"
        assert int(row["images"]) == 9
    # Baseline rows carry the published numbers only; cells without checkpoints say so.
    lsq = rows[("ResNet-18", "LSQ", 2)]
    assert lsq["published_top1"] == "67.6" and lsq["measured_top1"] == ""
    md = (out / "tables.md").read_text()
    assert "69.4 / no checkpoint" in md and "| ResNet-50 | PACT | 64.4 | 68.1 | 69.2 |" in md

    # Second run: everything comes from the cache.
    calls = []
    monkeypatch.setattr(reproduce_tables, "evaluate_checkpoint", lambda *a, **k: calls.append(a))
    assert reproduce_tables.main(argv) == 0
    assert calls == [] and "top-1 " in (text := capsys.readouterr().out) and text.count("(cached)") == 3
    # A new file is evaluated, the others still come from the cache.
    model = build_model(ModelConfig("resnet34", 3, True, CLASSES))
    extra = models / "d.pth.tar"
    _save_reference_format(model, extra)
    try:
        monkeypatch.undo()
        assert reproduce_tables.main(argv) == 0
        text = capsys.readouterr().out
        assert text.count("(cached)") == 3 and "d.pth.tar: resnet34_w3a3_qd1" in text
    finally:
        extra.unlink()


def _csv_rows(out):
    with open(out / "tables.csv") as f:
        return {(r["network"], r["method"], int(r["bits"])): r for r in csv.DictReader(f)}


def _cell(cfg, kind="checkpoint"):
    network, _, bits = cell_of(cfg)
    return network, row_method(Measurement(cfg, 0.0, kind=kind)), bits


def test_corrupt_and_unrecognised_files_are_named(setup, subprocess_env, tmp_path):
    _, data, models = setup
    bad_models = tmp_path / "models"
    bad_models.mkdir()
    good = bad_models / "good.pth.tar"
    good.write_bytes((models / "a.pth.tar").read_bytes())
    (bad_models / "corrupt.pth.tar").write_bytes((models / "a.pth.tar").read_bytes()[:5000])
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(3, 3), "module.blocks.0.w": torch.zeros(1)}},
               bad_models / "strange.pth")
    result = _run(["--models", str(bad_models), "--data", str(data), "--out", str(tmp_path / "out"),
                   "--image_size", "32", "--val_resize", "32", "--workers", "0", "--batch_size", "4"],
                  env=subprocess_env)
    assert result.returncode == 1
    err = result.stderr
    assert "corrupt.pth.tar" in err and "not a readable PyTorch checkpoint" in err
    assert "strange.pth" in err and "unrecognised" in err
    assert "Traceback" not in err
    # Each file's outcome is on its own progress line, as it comes, before the table.
    progress = result.stdout[:result.stdout.index("### ")].strip().splitlines()
    assert [line.split(": ", 1)[0] for line in progress if "evaluating" not in line] == [
        f"[{i}/3] {bad_models / name}" for i, name in enumerate(("corrupt.pth.tar", "good.pth.tar", "strange.pth"), 1)]
    assert "corrupt.pth.tar: not evaluated: " in progress[0] and "not a readable PyTorch checkpoint" in progress[0]
    assert "strange.pth: not evaluated: unrecognised" in progress[-1]
    # The good file was still evaluated and its cell filled.
    assert "good.pth.tar" in (tmp_path / "out" / "tables.md").read_text()


def test_bad_arguments(tmp_path, subprocess_env):
    result = _run(["--models", str(tmp_path / "nope"), "--data", str(tmp_path)], env=subprocess_env)
    assert result.returncode == 2 and "--models folder not found" in result.stderr
    (tmp_path / "m").mkdir()
    result = _run(["--models", str(tmp_path / "m"), "--data", str(tmp_path)], env=subprocess_env)
    assert result.returncode == 2 and "no val/ folder" in result.stderr


def test_runs_fill_trained_here_cells(tmp_path):
    run_dir = tmp_path / "runs" / "resnet18_2bit_quantize_downsample_False"
    run_dir.mkdir(parents=True)
    model = build_model(ModelConfig("resnet18", 2, False, 10))
    classes = [f"c{k}" for k in range(10)]
    torch.save({"state_dict": model.state_dict(), "args": {"data": str(tmp_path / "data")}, "classes": classes},
               run_dir / "checkpoint.pth.tar")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for epoch, top1 in enumerate([40.0, 70.5, 65.0]):
            f.write(json.dumps({"event": "epoch", "epoch": epoch, "val": {"top1": top1, "top5": 90.0,
                                                                             "count": 2000}}) + "\n")
    found, errors, skipped = reproduce_tables.run_measurements(str(tmp_path / "runs"), str(tmp_path / "data"),
                                                               classes, 2000)
    assert errors == skipped == [] and len(found) == 1 and found[0].top1 == 70.5 and found[0].kind == "trained here"
    md = render_markdown(build_table(load_paper_results(), found))
    assert "| ResNet-18 | N2UQ \\* (trained here, 10 classes) | 70.50 | — | — |" in md
    assert found[0].preprocessing == "crop 224 after resize 256"  # what the run's validation used


def test_runs_count_only_the_run_the_folder_holds():
    """An earlier run started over in the same folder, and an epoch logged again after a resume,
    do not count."""
    def epoch(e, top1):
        return {"event": "epoch", "epoch": e, "val": {"top1": top1}}

    records = [{"event": "start", "resume": None}, epoch(0, 90.0), epoch(1, 91.0), epoch(3, 95.0),  # an earlier run
               {"event": "start", "resume": None}, epoch(0, 40.0), epoch(1, 60.0),  # started over
               {"event": "start", "resume": "checkpoint.pth.tar"}, epoch(1, 55.0), epoch(2, 58.0)]
    assert [r["val"]["top1"] for r in reproduce_tables.current_run_epochs(records)] == [40.0, 55.0, 58.0]


def test_imagenet_models_sit_beside_the_published_number_others_apart():
    paper = load_paper_results()
    imagenet = Measurement(ModelConfig("resnet18", 2, False, 1000), 68.2, source="x")
    other = Measurement(ModelConfig("resnet18", 2, False, 10), 85.9, source="y")
    lsq = Measurement(ModelConfig("resnet18", 2, False, 1000, method="lsq"), 66.0, source="z")
    md = render_markdown(build_table(paper, [imagenet, other, lsq]))
    assert "| ResNet-18 | N2UQ \\* | 69.7 / 68.20 (-1.50) | 72.1 / no checkpoint | 73.1 / no checkpoint |" in md
    assert "| ResNet-18 | N2UQ \\* (10 classes) | 85.90 | — | — |" in md
    assert "| ResNet-18 | LSQ | 67.6 / 66.00 (-1.60) | 70.2 | 71.1 |" in md


def test_paper_results_file_covers_spec_table():
    rows = load_paper_results()
    assert len(rows) == 37
    n2uq = [r for r in rows if r.method.startswith("N2UQ")]
    assert len(n2uq) == 19 and all(r.checkpoint_url.startswith("https://") for r in n2uq)
    assert len({r.checkpoint_file for r in n2uq}) == 19
    cells = {(r.network, r.method, r.bits): r.top1 for r in rows}
    assert cells[("ResNet-18", "N2UQ", 2)] == 69.4 and cells[("ResNet-50", "N2UQ *", 2)] == 76.4
    assert cells[("MobileNet-V2", "N2UQ *", 4)] == 72.1 and cells[("ResNet-18", "DoReFa-Net", 3)] == 67.5
    for r in n2uq:  # the expected file name is the configuration's tag
        if r.network != "MobileNet-V2":
            cfg = ModelConfig({"ResNet-18": "resnet18", "ResNet-34": "resnet34", "ResNet-50": "resnet50"}[r.network],
                              r.bits, bool(r.quantize_downsample), 1000)
            assert r.checkpoint_file == cfg.tag + ".pth.tar" and cell_of(cfg) == (r.network, r.method, r.bits)


def _save_project_format(model, path, **args):
    """A checkpoint as this project's training writes it: the run's arguments and classes beside the weights."""
    torch.save({"state_dict": model.state_dict(), "args": args, "classes": [f"class_{k}" for k in range(CLASSES)],
                "epoch": 8}, path)


@pytest.fixture
def spied_transforms(monkeypatch):
    """Every ``(crop, resize)`` the table tool builds a validation transform for."""
    calls = []
    real = reproduce_tables.D.val_transform

    def spy(image_size, val_resize):
        calls.append((image_size, val_resize))
        return real(image_size, val_resize)

    monkeypatch.setattr(reproduce_tables.D, "val_transform", spy)
    return calls


def test_a_model_trained_at_another_resolution_is_evaluated_at_it(setup, tmp_path, capsys, spied_transforms):
    """A model trained at 32x32 is evaluated at 32x32 (what it records), as scripts/evaluate.py does;
    a flag that contradicts the file refuses it with one line naming the flag; no cell shows it."""
    _, data, _ = setup
    folder = tmp_path / "models" / "demo" / "run"
    folder.mkdir(parents=True)
    model = build_model(CONFIGS["a.pth.tar"])
    _randomise(model, 7)
    _save_project_format(model, folder / "model_best.pth.tar", image_size=28, val_resize=30)
    argv = ["--models", str(tmp_path / "models"), "--data", str(data), "--out", str(tmp_path / "out"),
            "--workers", "0", "--batch_size", "4"]
    assert reproduce_tables.main(argv) == 0
    printed = capsys.readouterr().out
    assert spied_transforms == [(28, 30)], spied_transforms
    assert "evaluating at crop 28 after resize 30 ..." in printed
    row = _csv_rows(tmp_path / "out")[_cell(CONFIGS["a.pth.tar"])]
    expected = json.loads(subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "--checkpoint", str(folder / "model_best.pth.tar"),
         "--data", str(data), "--json", "-j", "0", "--batch_size", "4"], capture_output=True, text=True,
        cwd=REPO_ROOT, check=True).stdout.splitlines()[-1])
    assert float(row["measured_top1"]) == pytest.approx(expected["top1"], abs=5e-5)
    assert row["preprocessing"] == "crop 28 after resize 30"

    # --image_size contradicting the file: refused on one line naming the flag, nothing measured, and
    # the cached result (made without the flag) is not used either.
    spied_transforms.clear()
    assert reproduce_tables.main([*argv, "--image_size", "224"]) == 1
    out, err = capsys.readouterr()
    assert spied_transforms == []
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder / 'model_best.pth.tar'}: ") and \
        "--image_size 224" in errors[0] and "leave --image_size out" in errors[0], err
    assert "not evaluated: was trained with image_size 28" in out
    assert _cell(CONFIGS["a.pth.tar"]) not in _csv_rows(tmp_path / "out")
    assert "model_best" not in (tmp_path / "out" / "tables.md").read_text()


def test_cache_is_keyed_by_the_preprocessing(setup, tmp_path, capsys, spied_transforms):
    """Files that record no size take the flags; a result cached under one crop is not reused for another."""
    _, data, models = setup
    argv = ["--models", str(models / "nested"), "--data", str(data), "--out", str(tmp_path / "out"),
            "--workers", "0", "--batch_size", "4", "--val_resize", "32"]
    assert reproduce_tables.main([*argv, "--image_size", "32"]) == 0
    assert reproduce_tables.main([*argv, "--image_size", "32"]) == 0
    assert reproduce_tables.main([*argv, "--image_size", "24"]) == 0
    printed = capsys.readouterr().out
    assert spied_transforms == [(32, 32), (24, 32)]
    assert printed.count("(cached)") == 1 and "crop 24 after resize 32" in printed


def test_models_of_another_data_set_are_skipped(setup, tmp_path, capsys):
    _, data, models = setup
    folder = tmp_path / "models"
    folder.mkdir()
    _save_reference_format(build_model(ModelConfig("resnet18", 2, False, 10)), folder / "ten.pth.tar")
    argv = ["--models", str(folder), "--data", str(data), "--out", str(tmp_path / "out"), "--workers", "0"]
    assert reproduce_tables.main(argv) == 1  # nothing under --models fits the data: say so
    out, err = capsys.readouterr()
    assert "ten.pth.tar: skipped: predicts 10 classes, the validation data has 4" in out
    assert "none of the 1 files" in err and "check --data" in err
    (folder / "a.pth.tar").write_bytes((models / "a.pth.tar").read_bytes())
    argv += ["--image_size", "32", "--val_resize", "32", "--batch_size", "4"]
    assert reproduce_tables.main(argv) == 0
    assert "skipped: predicts 10 classes" in capsys.readouterr().out
