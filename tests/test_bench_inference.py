"""scripts/benchmark.py --mode inference builds every compared model and prints one table row each; the
onnxruntime int8 baseline it compares against runs every conv on onnxruntime's 8-bit kernels (the
strongest uniform int8 model onnxruntime makes, not a weakened one). Times are not asserted."""

from __future__ import annotations

import argparse

import pytest

from n2uq.cli import run_main
from tests.conftest import save_model_checkpoint

pytest.importorskip("onnxruntime")
from scripts import bench_inference  # noqa: E402
from scripts.bench_inference import build_variants, fused_ops  # noqa: E402
from scripts.benchmark import main  # noqa: E402

TINY = ["--mode", "inference", "--image-size", "32", "--rounds", "1", "--warmup", "0", "--inference-batch-sizes", "1",
        "--threads", "1"]


def test_every_variant_is_built_and_the_int8_baseline_runs_every_conv_in_int8(tmp_path):
    args = argparse.Namespace(image_size=32, checkpoint=None, arch="resnet18", bits=2, quantize_downsample=0)
    variants = dict(build_variants(args, str(tmp_path)))
    assert len(variants) == 6, list(variants)  # float32, onnxruntime int8, exact, fast float, fast int8, int4
    int8 = fused_ops(next(p for label, p in variants.items() if "quantize_static" in label), 1)
    assert int8["QLinearConv"] == 20 and int8["Conv"] == 0, int8
    fast = fused_ops(next(p for label, p in variants.items() if label.endswith("int8 residual convs")), 1)
    assert fast["QLinearConv"] == 16 and fast["ConvInteger"] == 0, fast  # all but the stem and 3 downsamples


def test_inference_mode_prints_a_row_per_model(capsys):
    assert main(TINY) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "×" in line]
    assert len(rows) == 6, out
    assert "| float32 ONNX" in out and "1.00×" in out


def test_a_mobilenetv2_checkpoint_runs_against_torchvisions_mobilenet_v2(tmp_path, capsys):
    ckpt = save_model_checkpoint(tmp_path / "mbv2.pth.tar", "mobilenetv2", bits=4)
    assert main([*TINY, "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "×" in line]
    assert len(rows) == 5 and "N2UQ mobilenetv2_w4a4: exact export" in out, out  # no INT4 row above 3 bits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    return {"n2uq": save_model_checkpoint(folder / "w2.pth.tar"),
            "lsq": save_model_checkpoint(folder / "lsq.pth.tar", method="lsq")}


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent"], "--checkpoint file not found: /nonexistent"),
    (["--checkpoint", "{lsq}"], "is a lsq model: the inference benchmark exports N2UQ models"),
    (["--checkpoint", "{n2uq}", "--arch", "resnet34"], "--arch resnet34 contradicts"),
    (["--checkpoint", "{n2uq}", "--inference-bits", "4"], "--inference-bits 4 contradicts"),
    (["--checkpoint", "{n2uq}", "--quantize-downsample", "1"], "--quantize-downsample 1 contradicts"),
    (["--inference-bits", "9"], "--inference-bits must be in 1..8, got 9"),
    (["--image-size", "0"], "--image-size must be positive, got 0"),
    (["--rounds", "0"], "--rounds must be positive, got 0"),
    (["--inference-batch-sizes", "0"], "--inference-batch-sizes values must be positive"),
    (["--device", "cuda"], "--mode inference measures onnxruntime on the CPU"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoints, capsys, argv, message):
    argv = [a.format(**{k: str(v) for k, v in checkpoints.items()}) for a in argv]
    with pytest.raises(SystemExit) as info:
        run_main(main, [*TINY, *argv])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "== inference" not in out


def test_a_checkpoint_fills_in_its_own_settings(checkpoints):
    args = argparse.Namespace(device=None, checkpoint=str(checkpoints["n2uq"]), arch="resnet18", inference_bits=None,
                              quantize_downsample=0)
    bench_inference.check_inference_args(args)
    assert (args.arch, args.inference_bits, args.quantize_downsample) == ("resnet18", 2, 0)
    assert args.loaded[1].tag == "resnet18_w2a2_qd0"


def test_the_processor_name_comes_from_cpuinfo_when_platform_has_none(monkeypatch):
    import os

    monkeypatch.setattr(bench_inference.platform, "processor", lambda: "")
    name = bench_inference.processor_name()
    if os.path.isfile("/proc/cpuinfo") and "model name" in open("/proc/cpuinfo").read():
        assert name and not name.startswith(":")
    else:
        assert name == ""


def test_the_quantizer_table_shows_a_dash_for_a_skipped_column(capsys):
    assert main(["--mode", "quantizer", "--bits", "2", "--shape", "1", "1", "4", "4", "--rounds", "1",
                 "--warmup", "0", "--skip-reference"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("2 |"))
    assert "nan" not in row and row.count("—") == 2, row
