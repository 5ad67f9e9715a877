"""scripts/model_stats.py: counts for N2UQ and the compared methods' quantized convs, per-format bytes
only where the format can take the model, and flags that contradict a checkpoint refused."""

from __future__ import annotations

import re

import pytest

from n2uq.cli import run_main
from scripts.model_stats import main
from tests.conftest import save_model_checkpoint


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def total_row(out: str) -> list:
    return [c.strip() for c in next(ln for ln in out.splitlines() if ln.startswith("| **total"))[1:-1].split("|")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stats")
    return {method: save_model_checkpoint(folder / f"{method}.pth.tar", method=method)
            for method in ("n2uq", "lsq", "dorefa")}


@pytest.mark.parametrize("method", ["lsq", "dorefa"])
def test_a_compared_method_counts_its_quantized_convs(checkpoints, capsys, method):
    code, n2uq_out, _ = run([checkpoints["n2uq"]], capsys)
    assert code == 0
    code, out, err = run([checkpoints[method]], capsys)
    assert code == 0, err
    ours, theirs = total_row(n2uq_out), total_row(out)
    assert theirs[1:5] == ours[1:5], (theirs, ours)  # params, MACs, BOPs: the same convs at the same bits
    assert theirs[6:] == ["—", "—", "—"], theirs  # onnx, fast, packed: no integer export of a compared method
    assert f"packed bytes: — (integer export covers N2UQ models, not {method})" in out
    assert re.search(r"BOPs [0-9.]+x fewer\n", out) and "fewer packed" not in out


def test_onnx_and_fast_get_their_own_columns(checkpoints, capsys):
    code, out, _ = run([checkpoints["n2uq"]], capsys)
    row = total_row(out)
    assert code == 0 and "| onnx bytes | fast bytes | packed bytes |" in out
    assert row[7] == "≥" + row[6], row  # the fast file: at least the exact file's weight bytes


def test_formats_that_cannot_take_the_model_show_a_dash(capsys):
    code, out, _ = run(["resnet18", "--bits", "8", "--image_size", "32", "--num_classes", "10"], capsys)
    row = total_row(out)
    assert code == 0 and row[6:8] == ["—", "—"] and row[8] != "—", row
    assert "onnx bytes: — (its 8-bit weight codes do not fit int8" in out and "in ONNX" not in out


@pytest.mark.parametrize("argv, message", [
    (["resnet18", "--bits", "9"], "--bits must be in 1..8, got 9"),
    (["{n2uq}", "--num_classes", "5"], "--num_classes 5 contradicts"),
    (["{n2uq}", "--quantize_downsample", "1"], "--quantize_downsample 1 contradicts"),
    (["mobilenetv2", "--quantize_downsample", "1"], "mobilenetv2 has no downsample convs"),
    (["{lsq}", "--files"], "--files writes the integer exports, which cover N2UQ models, not lsq"),
])
def test_bad_flags_are_one_line_and_exit_2(checkpoints, capsys, argv, message):
    code, out, err = run([a.format(**{k: str(v) for k, v in checkpoints.items()}) for a in argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and out == "", err


def test_a_checkpoint_accepts_the_values_it_records(checkpoints, capsys):
    code, out, err = run([checkpoints["n2uq"], "--num_classes", "10", "--quantize_downsample", "0"], capsys)
    assert code == 0, err
