"""The paper's recipe scaled down (scripts/paper_recipe.py): the --full_lr_thresholds flag's parameter
groups, stage-1 reuse, the init + teacher wiring of stage 2, and the report's statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from n2uq.cli import UsageError
from n2uq.methods import Quantizers
from n2uq.recipe import ALPHA_LR_FACTOR, RESNET_ALPHA_PATTERNS, build_optimizer, split_parameters
from n2uq.resume import check_resume
from resnet import train as resnet_train
from resnet.resnet import resnet18, resnet50
from scripts import paper_recipe
from scripts import paper_recipe_report as report

LR = 1e-3


def _group_of(optimizer, model):
    """``{parameter name: (group name, lr)}`` of every optimised parameter."""
    where = {id(p): (g["name"], g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    return {name: where[id(p)] for name, p in model.named_parameters() if id(p) in where}


@pytest.mark.parametrize("build", [lambda q: resnet18(2, False, 10, q), lambda q: resnet50(2, True, 10, q)],
                         ids=["resnet18", "resnet50_qd"])
def test_full_lr_thresholds_moves_every_interval_length_to_the_full_lr(build):
    reference = build(Quantizers(2))
    ref = _group_of(build_optimizer(reference, LR), reference)
    model = build(Quantizers(2, full_lr_thresholds=True))
    got = _group_of(build_optimizer(model, LR), model)
    lengths = [n for n in got if n.endswith(".a")]
    assert len(lengths) == sum(1 for n, _ in model.named_parameters() if n.endswith(".a")) >= 16
    assert all(got[n] == ("other", LR) for n in lengths)
    # The rest is the reference's grouping: start and the scales stay at lr/10, weights in 'weights'.
    assert {n: g for n, g in got.items() if n not in lengths} == {n: g for n, g in ref.items() if n not in lengths}
    assert got["layer1.0.quan1.start"] == ("alpha", LR * ALPHA_LR_FACTOR) == ref["layer1.0.quan2.a"]
    assert got["layer1.0.quan1.scale1"][0] == "alpha" and got["layer1.0.conv1.weight"] == ("weights", LR)


def test_full_lr_thresholds_excludes_the_opposite_switch_and_frozen_intervals():
    model = resnet18(2, False, 10, Quantizers(2, full_lr_thresholds=True))
    with pytest.raises(ValueError, match="pass one of them"):
        split_parameters(model, RESNET_ALPHA_PATTERNS, all_ltq_a=True)
    with pytest.raises(ValueError, match="frozen"):
        Quantizers(2, learned_thresholds=False, full_lr_thresholds=True)
    with pytest.raises(ValueError, match="do not apply to lsq"):
        Quantizers(2, "lsq", full_lr_thresholds=True)


def _seen_by_train(argv, monkeypatch):
    from n2uq import engine

    seen = []
    monkeypatch.setattr(engine, "fit", lambda build, cfg, **kw: seen.append((cfg, kw)))
    assert resnet_train.main(argv) == 0
    return seen[-1]


def test_flag_reaches_the_run_folder_the_checkpoint_and_the_usage_checks(tiny_imagefolder, monkeypatch, tmp_path):
    data = ["--data", str(tiny_imagefolder), "--quantize_downsample", "0", "--save", str(tmp_path)]
    cfg, kw = _seen_by_train([*data, "--full_lr_thresholds"], monkeypatch)
    assert kw["run_name"] == "resnet18_n2uq-full-lr-thresholds_2bit_quantize_downsample_False"
    assert cfg.flags()["full_lr_thresholds"] is True
    assert kw["config"]["method"] == "n2uq-full-lr-thresholds" and kw["config"]["quantizers"]["full_lr_thresholds"]
    for extra, text in ((["--uniform_thresholds"], "pass one of them"), (["--method", "lsq"], "does not apply"),
                        (["--alpha_group", "all_ltq"], "pass one of them"), (["--full_precision"], "drop --method")):
        with pytest.raises(UsageError, match=text):
            resnet_train.main([*data, "--full_lr_thresholds", *extra])
    # Resuming a plain N2UQ checkpoint with the flag (or the reverse) is refused.
    ckpt = {"config": {"arch": "resnet18", "n_bit": 2, "quantize_downsample": False, "method": "n2uq"},
            "step_in_epoch": 0}
    with pytest.raises(UsageError, match="holds another model"):
        check_resume(ckpt, "F", {**ckpt["config"], "method": kw["config"]["method"]}, cfg.flags(),
                     {"world_size": 1, "train_images": 8})


# --- the driver, with resnet/train.py's real command line and a fake engine ----------------------------------

def _fake_fit(calls):
    """``engine.fit`` that trains nothing: advances the checkpoint by ``--epochs_per_run`` epochs and
    writes what the engine writes (checkpoint args and config, metrics.jsonl), N2UQ's ``a`` drifting."""

    def fit(build, cfg, run_name, config, **kw):
        run_dir = Path(cfg.run.save) / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "checkpoint.pth.tar"
        done = int(torch.load(path)["next_epoch"]) if path.exists() else 0
        now = min(cfg.optim.epochs, done + (cfg.run.epochs_per_run or cfg.optim.epochs))
        state = {"fc.weight": torch.zeros(2, 2)}
        if config.get("quantizers", {}).get("method") == "n2uq":
            state["layer1.0.quan1.start"] = torch.zeros(1)
            state["layer1.0.quan1.a"] = torch.tensor([2 / 3 + 0.01 * now] * 3)
        torch.save({"args": cfg.flags(), "config": config, "next_epoch": now, "step_in_epoch": 0,
                    "val_top1": 50.0 + now, "state_dict": state}, path)
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": "start", "args": cfg.flags()}) + "\n")
            for e in range(done, now):
                f.write(json.dumps({"event": "epoch", "epoch": e, "train": {"loss": 1.0, "time_s": 1.0},
                                    "val": {"top1": 50.0 + e + cfg.run.seed}}) + "\n")
        calls.append(cfg)

    return fit


@pytest.fixture
def driver(tiny_imagefolder, monkeypatch, tmp_path):
    from n2uq import engine

    calls = []
    monkeypatch.setattr(engine, "fit", _fake_fit(calls))
    monkeypatch.setattr(paper_recipe, "call_train", lambda run, argv, out: resnet_train.main(argv))
    out = tmp_path / "out"
    argv = ["--data", str(tiny_imagefolder), "--out", str(out), "--seeds", "0", "1", "--fp_epochs", "2",
            "--epochs", "3", "--no_pictures"]
    return argv, out, calls


def test_stage_two_is_initialised_and_taught_by_its_own_seeds_full_precision_model(driver):
    argv, out, calls = driver
    assert paper_recipe.main(argv) == 0
    fp = [c for c in calls if c.student.full_precision]
    quantized = [c for c in calls if not c.student.full_precision]
    assert sorted(c.run.seed for c in fp) == [0, 1] and all(c.optim.teacher == "none" for c in fp)
    assert len(quantized) == 2 * 4 * 3  # seeds x arms x one call per epoch (--snapshot_every 1)
    for c in quantized:
        fp_file = str(out / f"seed{c.run.seed}" / "resnet18_fp" / "checkpoint.pth.tar")
        assert c.student.pretrained == c.optim.teacher_weights == fp_file
        assert c.optim.teacher == "resnet18" and c.optim.epochs == 3 and c.run.epochs_per_run == 1
    lines = (out / "seed1" / "resnet18_2bit_quantize_downsample_False" / "intervals.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    assert not (out / "seed1" / "resnet18_lsq_2bit_quantize_downsample_False" / "intervals.jsonl").exists()


def test_stage_one_is_reused_when_finished_and_refused_when_trained_otherwise(driver):
    argv, out, calls = driver
    assert paper_recipe.main(argv) == 0
    first = len(calls)
    assert paper_recipe.main(argv) == 0
    assert len(calls) == first  # everything finished: nothing trained again
    assert paper_recipe.main([*argv, "--arms", "lsq", "--bits", "3"]) == 0
    assert not any(c.student.full_precision for c in calls[first:]) and len(calls) == first + 2 * 3
    fp_file = out / "seed0" / "resnet18_fp" / "checkpoint.pth.tar"
    before = fp_file.read_bytes()
    with pytest.raises(UsageError, match=r"seed0/resnet18_fp was trained with other flags \(--epochs 2 vs 4"):
        paper_recipe.main([*argv, "--fp_epochs", "4"])
    assert fp_file.read_bytes() == before
    ckpt = torch.load(fp_file)
    ckpt["args"]["learning_rate"] = 0.01
    torch.save(ckpt, fp_file)
    other = fp_file.read_bytes()
    with pytest.raises(UsageError, match="--learning_rate 0.01 vs 0.002"):
        paper_recipe.main(argv)
    assert fp_file.read_bytes() == other and len(calls) == first + 6  # refused: not retrained, not overwritten


def test_compare_methods_hands_recipe_paper_to_the_driver(monkeypatch):
    from scripts import compare_methods

    seen = []
    monkeypatch.setattr(paper_recipe, "main", lambda argv: seen.append(argv) or 0)
    assert compare_methods.main(["--data", "D", "--recipe", "paper", "--seeds", "0"]) == 0
    assert compare_methods.main(["--recipe=paper"]) == 0
    assert seen == [["--data", "D", "--seeds", "0"], []]
    assert paper_recipe.delegated_argv(["--recipe", "--teacher none"]) is None


# --- the report's statistics, on synthetic metrics ------------------------------------------------------------

def _write_run(out, arm_flags, seed, top1s, intervals=None, epochs=None):
    folder = out / f"seed{seed}" / f"run_{len(list(out.glob(f'seed{seed}/*')))}"
    folder.mkdir(parents=True)
    args = {"method": "n2uq", "n_bit": 2, "seed": seed, "epochs": epochs or len(top1s), **arm_flags}
    events = [{"event": "start", "args": args}] + [{"event": "epoch", "epoch": e, "train": {"loss": 1.0, "time_s": 2.0},
                                                    "val": {"top1": t}} for e, t in enumerate(top1s)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if intervals:
        lines = [json.dumps({"epoch": e, "a": a}) + "\n" for e, a in intervals.items()]
        (folder / "intervals.jsonl").write_text("".join(lines))


def test_t_quantiles_match_the_tables():
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert report.t_quantile_975(df) == pytest.approx(t, abs=1e-4)


def test_report_pairs_by_seed_and_says_when_the_interval_covers_zero(tmp_path):
    out = tmp_path / "out"
    plain = {0: [70.0, 80.0], 1: [71.0, 82.0], 2: [72.0, 81.0]}
    uniform = {0: [70.0, 79.0], 1: [70.0, 80.5], 2: [70.0, 80.0]}  # differences 1.0, 1.5, 1.0
    lsq = {0: [70.0, 81.0], 1: [70.0, 80.0], 2: [70.0, 83.0]}  # differences -1.0, 2.0, -2.0
    for seed in range(3):
        snapshots = {1: {"layer1.0.quan1": [0.7, 0.6, 0.7]}, 2: {"layer1.0.quan1": [0.9, 0.5, 0.6]}}
        _write_run(out, {}, seed, plain[seed], snapshots)
        _write_run(out, {"uniform_thresholds": True}, seed, uniform[seed])
        _write_run(out, {"method": "lsq"}, seed, lsq[seed])
    _write_run(out, {"uniform_thresholds": True}, 3, [60.0], epochs=2)  # unfinished (1 of 2 epochs): left out
    (out / "wall_time.jsonl").write_text(json.dumps({"run": "n2uq W2A2", "seed": 0, "seconds": 120.0,
                                                     "load_before": 1.0, "load_after": 2.0, "code": 0}) + "\n")
    text = report.write_report(out, None)[0].read_text()
    mean, half = 7 / 6, 4.3027 * statistics_stdev([1.0, 1.5, 1.0]) / math.sqrt(3)
    assert f"| n2uq − n2uq-uniform-thresholds | W2A2 | +1.00, +1.50, +1.00 | +{mean:.2f} | " \
           f"[{mean - half:+.2f}, {mean + half:+.2f}] | n2uq higher than n2uq-uniform-thresholds |" in text
    assert "| n2uq − lsq | W2A2 | -1.00, +2.00, -2.00 | -0.33 |" in text
    lsq_line = next(line for line in text.splitlines() if line.startswith("| n2uq − lsq |"))
    assert lsq_line.endswith("| inside the noise (the interval covers 0) |")
    assert "| n2uq | W2A2 | 81.00 ± 1.00 | 0: 80.00, 1: 82.00, 2: 81.00 | 3 |" in text
    assert "Not finished (left out of the tables): seed3/run_0 (1/2 epochs)" in text
    # movement after epoch 2, seed-averaged: |0.9 - 2/3| = 0.2333 max, mean (0.2333 + 0.1667 + 0.0667) / 3
    assert "| layer1.0.quan1 | 0.2333 | 0.1556 |" in text and "| 1 | 0.0667 | 0.0444 |" in text
    assert "1 train.py calls, 2.0 min in all" in text


def statistics_stdev(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@pytest.mark.slow
def test_two_stages_end_to_end_on_tiny_data(tmp_path, subprocess_env):
    """The real resnet/train.py: stage-2 checkpoints record the seed's stage-1 file as init and teacher,
    N2UQ's interval lengths are snapshotted per epoch, and the report and pictures are written."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, make_image_folder

    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=50, val_per_class=4, size=16)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "compare_methods.py"), "--recipe", "paper", "--data", str(data),
           "--out", str(out), "--seeds", "0", "1", "--fp_epochs", "2", "--epochs", "2", "--arms", "n2uq", "lsq"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for seed in (0, 1):
        fp = str(out / f"seed{seed}" / "resnet18_fp" / "checkpoint.pth.tar")
        for run in ("resnet18_2bit_quantize_downsample_False", "resnet18_lsq_2bit_quantize_downsample_False"):
            args = torch.load(out / f"seed{seed}" / run / "checkpoint.pth.tar")["args"]
            assert (args["pretrained"], args["teacher_weights"], args["teacher"]) == (fp, fp, "resnet18")
        snapshots = (out / f"seed{seed}" / "resnet18_2bit_quantize_downsample_False" / "intervals.jsonl").read_text()
        assert [json.loads(line)["epoch"] for line in snapshots.splitlines()] == [1, 2]
    text = (out / "paper_recipe.md").read_text()
    assert "| n2uq − lsq | W2A2 |" in text and "| full precision | FP |" in text
    assert {p.name for p in out.glob("*.png")} == {"curves.png", "movement.png", "thresholds_n2uq_w2.png"}
    again = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "trained" not in again.stdout.replace("reused", ""), again.stdout
