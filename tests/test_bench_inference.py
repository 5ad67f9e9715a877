"""scripts/benchmark.py --mode inference builds every compared model and prints one table row each; the
onnxruntime int8 baseline it compares against runs every conv on onnxruntime's 8-bit kernels (the
strongest uniform int8 model onnxruntime makes, not a weakened one). Times are not asserted."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("onnxruntime")
from scripts.bench_inference import build_variants, fused_ops  # noqa: E402
from scripts.benchmark import get_args_parser, main  # noqa: E402


def test_every_variant_is_built_and_the_int8_baseline_runs_every_conv_in_int8(tmp_path):
    args = argparse.Namespace(image_size=32, checkpoint=None, arch="resnet18", bits=2, quantize_downsample=0)
    variants = dict(build_variants(args, str(tmp_path)))
    assert len(variants) == 6, list(variants)  # float32, onnxruntime int8, exact, fast float, fast int8, int4
    int8 = fused_ops(next(p for label, p in variants.items() if "quantize_static" in label), 1)
    assert int8["QLinearConv"] == 20 and int8["Conv"] == 0, int8
    fast = fused_ops(next(p for label, p in variants.items() if label.endswith("int8 residual convs")), 1)
    assert fast["QLinearConv"] == 16 and fast["ConvInteger"] == 0, fast  # all but the stem and 3 downsamples


def test_inference_mode_prints_a_row_per_model(capsys):
    args = get_args_parser().parse_args(["--mode", "inference", "--image-size", "32", "--rounds", "1",
                                         "--warmup", "0", "--inference-batch-sizes", "1", "--threads", "1"])
    main(args)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "×" in line]
    assert len(rows) == 6, out
    assert "| float32 ONNX" in out and "1.00×" in out
