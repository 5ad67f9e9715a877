"""scripts/export.py: end to end on a generated checkpoint, and its errors (exit 2 usage, 1 runtime)."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from n2uq.cli import run_main
from n2uq.export.synthetic import randomize_
from resnet.resnet import resnet18
from scripts.export import main

pytest.importorskip("onnxruntime")


def save_checkpoint(path, bits: int = 2):
    """A W``bits`` ResNet-18 (quantized downsample, 10 classes, 32×32) with generated trained-looking weights."""
    torch.manual_seed(0)
    model = resnet18(bits, True, 10)
    randomize_(model, torch.randn(8, 3, 32, 32), seed=11)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state, "best_top1_acc": 10.0,
                "args": {"image_size": 32, "val_resize": 32}}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pth.tar")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    gen = torch.Generator().manual_seed(0)
    for c in range(10):
        folder = root / "val" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as info:
        run_main(main, [str(a) for a in argv])
    return info.value.code


def test_exports_and_verifies_all_formats(checkpoint, data_dir, tmp_path, capsys):
    pytest.importorskip("qonnx", reason="the qonnx format needs the qonnx package (pip install qonnx)")
    out = tmp_path / "out"
    code = exit_code(["--checkpoint", checkpoint, "--out", out, "--data", data_dir, "--batch_size", 4])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "resnet18_w2a2_qd1" in text
    for line in ("integer model vs PyTorch fake-quant: OK", "onnx (onnxruntime) vs integer model: OK",
                 "qonnx (qonnx executor) vs integer model: OK", "packed file round trip: OK",
                 "fast onnx (onnxruntime) vs integer model: APPROXIMATE ("):
        assert line in text
    # the int8 fast file is lossy: reported as approximate, never as verified
    assert "all exports verified" not in text and "exports verified except" in text
    assert "quantized conv weights (2-bit codes)" in text  # the size table
    for suffix in (".onnx", ".fast.onnx", ".qonnx.onnx", ".n2uq"):
        assert (out / f"resnet18_w2a2_qd1{suffix}").is_file()
    assert not list(out.glob("*.tmp"))  # every file written beside itself, then renamed


def test_val_top1_compares_onnx_with_pytorch(checkpoint, data_dir, tmp_path, capsys):
    code = exit_code(["--checkpoint", checkpoint, "--out", tmp_path, "--data", data_dir, "--format", "onnx",
                      "--val_top1"])
    text = capsys.readouterr().out
    assert "val top-1 over 20 images: PyTorch fake-quant" in text and "PyTorch integer model" in text
    # Passes when equal, or when every differing prediction is a float32 rounding flip of PyTorch.
    assert (code == 0) == ("-> equal" in text or "0 of them where" in text)


def test_val_top1_checks_the_fast_export(checkpoint, data_dir, tmp_path, capsys):
    code = exit_code(["--checkpoint", checkpoint, "--out", tmp_path, "--data", data_dir, "--format", "fast",
                      "--fast_residual", "float", "--val_top1"])
    text = capsys.readouterr().out
    # Float residual convs: the fast file predicts what the PyTorch integer model predicts.
    assert code == 0 and "as the integer model on all -> OK" in text, text


def test_a_lossy_fast_file_is_reported_approximate_with_its_end_to_end_agreement(checkpoint, tmp_path, capsys):
    assert exit_code(["--checkpoint", checkpoint, "--out", tmp_path, "--format", "fast"]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("fast onnx (onnxruntime) vs integer model:"))
    assert ": APPROXIMATE (" in line and ": OK" not in line, line
    for part in ("residual-stream convs requantized to 8 bits", "top-1 same as the PyTorch fake-quant model on ",
                 "of their scale", "of the codes differ"):
        assert part in line, line
    assert "calibrated on the 8 check images" in text
    last = text.strip().splitlines()[-1]
    assert "all exports verified" not in text and "not verified" in last and "--val_top1" in last, last


def test_an_exact_fast_file_is_verified(checkpoint, tmp_path, capsys):
    assert exit_code(["--checkpoint", checkpoint, "--out", tmp_path, "--format", "fast",
                      "--fast_residual", "float"]) == 0
    text = capsys.readouterr().out
    assert "fast onnx (onnxruntime) vs integer model: OK" in text and "all exports verified" in text


def test_the_fast_file_is_calibrated_on_more_val_images_than_the_check_batch(checkpoint, data_dir, tmp_path, capsys):
    argv = ["--checkpoint", checkpoint, "--out", tmp_path, "--format", "fast", "--data", data_dir]
    assert exit_code(argv) == 0
    assert "int8 over ranges calibrated on 20 val images" in capsys.readouterr().out  # all 20 (default 64)
    assert exit_code([*argv, "--calibration_images", 12]) == 0
    assert "int8 over ranges calibrated on 12 val images" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [[], ["--fast_residual", "float"], ["--format", "onnx"]])
def test_calibration_images_without_an_int8_fast_file_from_val_exits_2(checkpoint, data_dir, tmp_path, capsys,
                                                                      flags):
    data = [] if not flags else ["--data", data_dir]
    assert exit_code(["--checkpoint", checkpoint, "--out", tmp_path / "out", "--calibration_images", 16,
                      *data, *flags]) == 2
    assert "--calibration_images sets how many" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    return {bits: save_checkpoint(folder / f"w{bits}.pth.tar", bits) for bits in (6, 8)}


@pytest.mark.parametrize("bits, formats, message", [
    (8, "onnx", "--format onnx cannot take this model: its 8-bit weight codes do not fit int8"),
    (8, "packed,fast", "--format fast cannot take this model"),
    (6, "onnx,qonnx,packed", "--format qonnx cannot take this model: accumulators up to"),
])
def test_a_format_the_model_exceeds_is_refused_before_anything_is_written(wide_checkpoints, tmp_path, capsys,
                                                                          bits, formats, message):
    out = tmp_path / "out"
    assert exit_code(["--checkpoint", wide_checkpoints[bits], "--out", out, "--format", formats]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_default_formats_skip_what_the_model_exceeds_with_one_line(wide_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    assert exit_code(["--checkpoint", wide_checkpoints[8], "--out", out]) == 0
    text = capsys.readouterr().out
    for f in ("onnx", "fast", "qonnx"):
        assert f"skipping the {f} format: " in text
    assert [p.name for p in out.iterdir()] == ["resnet18_w8a8_qd1.n2uq"] and "all exports verified" in text


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_an_out_folder_that_cannot_be_created_exits_2_before_converting(checkpoint, capsys):
    assert exit_code(["--checkpoint", checkpoint, "--out", "/proc/n2uq_export_out", "--format", "packed"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: --out /proc/n2uq_export_out") and len(err.strip().splitlines()) == 1, err
    assert "integer model" not in out


def hide_package(monkeypatch, name):
    import scripts.export as export_script

    real = export_script.importlib.util.find_spec
    monkeypatch.setattr(export_script.importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def test_default_formats_skip_a_missing_package_with_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    hide_package(monkeypatch, "qonnx")
    out = tmp_path / "out"
    assert exit_code(["--checkpoint", checkpoint, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "skipping the qonnx format: qonnx not installed (pip install qonnx)" in text
    assert (out / "resnet18_w2a2_qd1.onnx").is_file() and not (out / "resnet18_w2a2_qd1.qonnx.onnx").exists()


def test_a_format_asked_for_without_its_package_exits_2_before_writing(checkpoint, tmp_path, capsys, monkeypatch):
    hide_package(monkeypatch, "qonnx")
    out = tmp_path / "out"
    assert exit_code(["--checkpoint", checkpoint, "--out", out, "--format", "onnx,qonnx"]) == 2
    err = capsys.readouterr().err
    assert "pip install qonnx" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_random_batch_and_one_format(checkpoint, tmp_path, capsys):
    assert exit_code(["--checkpoint", checkpoint, "--out", tmp_path, "--format", "packed"]) == 0
    text = capsys.readouterr().out
    assert "random normal" in text and "(8, 3, 32, 32)" in text  # size from the checkpoint's args
    assert not (tmp_path / "resnet18_w2a2_qd1.onnx").exists()


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx,tflite"], "--format"),
    (["--batch_size", "0"], "--batch_size"),
    (["--val_top1"], "--val_top1 needs --data"),
    (["--data", "/nonexistent/dir"], "no val/ folder"),
    (["--image_size", "64"], "was trained with image_size 32, but --image_size 64 was given"),
])
def test_usage_errors_exit_2(checkpoint, tmp_path, capsys, argv, message):
    assert exit_code(["--checkpoint", checkpoint, "--out", tmp_path, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_class_folders_other_than_the_checkpoint_records_exit_2(checkpoint, data_dir, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    other = tmp_path / "other.pth.tar"
    torch.save({**ckpt, "classes": [f"kind{c}" for c in range(10)]}, other)
    out = tmp_path / "out"
    assert exit_code(["--checkpoint", other, "--out", out, "--data", data_dir, "--format", "packed"]) == 2
    assert "class folders differ from the ones the checkpoint was trained on" in capsys.readouterr().err
    assert not out.exists()


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert exit_code(["--checkpoint", tmp_path / "nope.pth", "--out", tmp_path]) == 2
    assert "not found" in capsys.readouterr().err


def test_corrupt_checkpoint_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"\x00" * 100)
    assert exit_code(["--checkpoint", bad, "--out", tmp_path]) == 1
    err = capsys.readouterr().err
    assert "bad.pth.tar" in err and len(err.strip().splitlines()) == 1
