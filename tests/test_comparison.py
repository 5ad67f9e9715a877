"""``scripts/compare_methods.py`` (methods × bits × seeds through the one engine, resumable, with its
report) and ``scripts/show_thresholds.py`` (the learned thresholds of a real checkpoint)."""

from __future__ import annotations

import csv

import pytest

from n2uq.cli import run_main
from scripts import compare_methods, show_thresholds
from scripts.comparison_report import RunResult, render_markdown, summarize

TINY_RECIPE = "--teacher none --pretrained none --batch_size 6 --image_size 16 --val_resize 16 -j 0"
GRID = ["--methods", "n2uq", "dorefa", "--bits", "2", "--seeds", "0", "--ablations", "--no_full_precision",
        "--epochs", "2", "--recipe", TINY_RECIPE]


def _run(main, argv):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    return exit_info.value.code


@pytest.fixture(scope="module")
def comparison(tiny_imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("comparison")
    assert _run(compare_methods.main, ["--data", str(tiny_imagefolder), "--out", str(out), *GRID]) == 0
    return out


def test_every_cell_is_trained_through_train_py_and_reported(comparison, tiny_imagefolder):
    n2uq_run = comparison / "seed0" / "resnet18_2bit_quantize_downsample_False"
    dorefa_run = comparison / "seed0" / "resnet18_dorefa_2bit_quantize_downsample_False"
    assert (n2uq_run / "model_best.pth.tar").is_file() and (dorefa_run / "model_best.pth.tar").is_file()
    with open(comparison / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["bits"], r["seed"]) for r in rows] == [("n2uq", "2", "0"), ("dorefa", "2", "0")]
    for row, run in zip(rows, (n2uq_run, dorefa_run)):
        assert float(row["final_top1"]) == pytest.approx(compare_methods.finished(run, 2)[0], abs=0.005)
    assert [r["paper_imagenet_top1"] for r in rows] == ["69.7", "64.7"]  # the paper's ResNet-18 W2A2 rows
    report = (comparison / "comparison.md").read_text()
    assert f"data {tiny_imagefolder.resolve()};" in report  # the report names the data it measured on
    assert "| N2UQ | " in report and "| DoReFa-Net | " in report and "LSQ" not in report


def test_a_repeated_command_trains_nothing(comparison, tiny_imagefolder, capsys):
    before = {p: p.stat().st_mtime_ns for p in comparison.glob("seed0/*/checkpoint.pth.tar")}
    assert _run(compare_methods.main, ["--data", str(tiny_imagefolder), "--out", str(comparison), *GRID]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == 2 and "training ..." not in out
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.parametrize("change, flag", [
    (["--epochs", "3"], "--epochs: 3 asked, 2 recorded"),
    (["--recipe", TINY_RECIPE.replace("--batch_size 6", "--batch_size 4")], "--batch_size: 4 asked, 6 recorded"),
    (["--recipe", TINY_RECIPE + " --learning_rate 1e-2", "--report_only"], "--learning_rate: 1e-2 asked, 0.001"),
])
def test_runs_of_another_recipe_are_neither_reused_nor_resumed(comparison, tiny_imagefolder, capsys, change, flag):
    before = {p: p.stat().st_mtime_ns for p in comparison.rglob("*.pth.tar")}
    argv = ["--data", str(tiny_imagefolder), "--out", str(comparison), *GRID, *change]
    assert _run(compare_methods.main, argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "was trained with other settings (" in lines[0] and flag in lines[0], lines
    assert captured.out == "" and {p: p.stat().st_mtime_ns for p in before} == before


def test_runs_trained_on_other_data_are_not_reported(comparison, tmp_path, capsys):
    """--data is part of a run's result: a run of the grid trained on other images is refused."""
    argv = ["--data", str(tmp_path), "--out", str(comparison), *GRID, "--report_only"]
    assert _run(compare_methods.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--data: {tmp_path} asked" in err, err


@pytest.mark.parametrize("change, message", [
    (["--recipe", TINY_RECIPE + " --seed 7"], "--recipe sets --seed, which the grid sets for each run"),
    (["--recipe", TINY_RECIPE + " --epochs=3"], "--recipe sets --epochs, which the grid sets"),
    (["--recipe", TINY_RECIPE + " --n_bit 4"], "--recipe sets --n_bit, which the grid sets"),
    (["--recipe", TINY_RECIPE + " --sav x"], "--recipe sets --sav, which the grid sets"),
    (["--seeds", "0", "0"], "--seeds repeats a seed"),
])
def test_a_grid_that_would_report_one_run_as_another_is_refused(tiny_imagefolder, tmp_path, capsys, change, message):
    """The recipe may not override the grid's own flags (every seed would be one run, reported as several),
    and a repeated seed would count one run twice."""
    argv = ["--data", str(tiny_imagefolder), "--out", str(tmp_path / "out"), *GRID, *change]
    assert _run(compare_methods.main, argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1 and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_paper_recipe_refuses_the_grid_options_it_has_not(tiny_imagefolder, tmp_path, capsys):
    argv = ["--recipe", "paper", "--methods", "lsq", "--data", str(tiny_imagefolder), "--out", str(tmp_path / "o")]
    assert _run(compare_methods.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --methods is not an option of --recipe paper (scripts/paper_recipe.py): it trains the "
                   "arms given by --arms, e.g. --arms n2uq lsq")
    assert not (tmp_path / "o").exists()


def test_report_only_needs_finished_runs(tmp_path, capsys):
    assert _run(compare_methods.main, ["--out", str(tmp_path), "--report_only", *GRID]) == 2
    assert "no finished run of 2 epochs" in capsys.readouterr().err


def test_summary_and_seed_spread_verdicts():
    results = [RunResult("n2uq", 2, s, top1, top1) for s, top1 in enumerate((80.0, 82.0, 81.0))]
    results += [RunResult("lsq", 2, s, top1, top1) for s, top1 in enumerate((84.0, 85.0, 86.0))]
    results += [RunResult("pact", 2, s, top1, top1) for s, top1 in enumerate((80.5, 81.5, 81.0))]
    summary = summarize(results)
    assert summary[("n2uq", 2)].mean == pytest.approx(81.0) and summary[("n2uq", 2)].std == pytest.approx(1.0)
    report = render_markdown(summary, "test recipe")
    assert "| N2UQ | 81.00 ± 1.00 (3) | 69.7 |" in report
    assert "N2UQ − LSQ = -4.00 points (spread 2.00): larger than the seed spread" in report
    assert "N2UQ − PACT = +0.00 points (spread 1.50): within the seed spread" in report


def test_show_thresholds_draws_a_trained_checkpoint(comparison, tiny_imagefolder, tmp_path, capsys):
    ckpt = comparison / "seed0" / "resnet18_2bit_quantize_downsample_False" / "model_best.pth.tar"
    png = tmp_path / "thresholds.png"
    argv = ["--checkpoint", str(ckpt), "--data", str(tiny_imagefolder), "--images", "4", "--out", str(png),
            "--layers", "layer1.0.quan1", "layer4.1.quan2"]
    assert _run(show_thresholds.main, argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "layer1.0.quan1, layer4.1.quan2" in capsys.readouterr().out


@pytest.mark.parametrize("run, layers, message", [
    ("resnet18_2bit_quantize_downsample_False", ["layer9.quan1"], "no LTQ layer named layer9.quan1"),
    ("resnet18_dorefa_2bit_quantize_downsample_False", [], "the checkpoint has no LTQ layer"),
])
def test_show_thresholds_bad_input_is_one_line(comparison, tmp_path, capsys, run, layers, message):
    argv = ["--checkpoint", str(comparison / "seed0" / run / "model_best.pth.tar"), "--out", str(tmp_path / "t.png")]
    assert _run(show_thresholds.main, argv + (["--layers", *layers] if layers else [])) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _summary(bits):
    results = [RunResult(label, b, seed, 80.0 + seed, 80.0 + seed) for b in bits for seed in (0, 1)
               for label in ("n2uq", "n2uq-uniform-thresholds", "lsq", "pact", "dorefa")]
    return summarize(results + [RunResult("full precision", None, 0, 86.0, 86.0)])


@pytest.mark.parametrize("bits", [(2,), (2, 4)])
def test_plot_points_are_centred_on_their_bit_width_apart_and_unjoined(bits):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from scripts.comparison_report import figure, point_positions

    summary = _summary(bits)
    positions = point_positions(summary)
    for slot, b in enumerate(bits):
        xs = sorted(x for (_, pb), x in positions.items() if pb == b)
        assert len(xs) == 5 and sum(xs) / len(xs) == pytest.approx(slot)  # centred on the tick
        assert min(x2 - x1 for x1, x2 in zip(xs, xs[1:])) >= 0.1  # apart, so no marker hides another
        assert slot - 0.5 < xs[0] and xs[-1] < slot + 0.5  # inside the bit width's own slot
    fig = figure(summary)
    try:
        ax = fig.axes[0]
        assert list(ax.get_xticks()) == list(range(len(bits))) and ax.get_xlim() == (-0.5, len(bits) - 0.5)
        data_lines = [line for line in ax.lines if len(line.get_xdata()) > 1 and line.get_linestyle() != "--"]
        assert all(line.get_linestyle() == "None" for line in data_lines)  # categories are not joined
        markers = {line.get_marker() for line in ax.lines if line.get_marker() not in (None, "None", "", "_")}
        assert len(markers) == 5  # a marker of its own per method
    finally:
        plt.close(fig)


def test_the_documented_commands_write_the_shipped_pictures():
    import re

    from tests.conftest import REPO_ROOT

    doc = (REPO_ROOT / "docs" / "comparison.md").read_text()
    shown = set(re.findall(r"!\[[^\]]*\]\(comparison/([\w.]+\.png)\)", doc))
    written = set(re.findall(r"--out docs/comparison/([\w.]+\.png)", doc)) | {"comparison.png"}  # the report's
    assert shown and shown == written, (shown, written)
    assert all((REPO_ROOT / "docs" / "comparison" / name).is_file() for name in shown)
