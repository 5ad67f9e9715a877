"""The engine on CUDA: AMP (bf16 and fp16 with a GradScaler) and channels_last, one tiny epoch each."""

from __future__ import annotations

import pytest
import torch

from n2uq.checkpoint import read_checkpoint
from resnet import train as resnet_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_one_epoch_on_cuda_with_amp(tiny_imagefolder, tmp_path, amp):
    argv = ["--data", str(tiny_imagefolder), "--save", str(tmp_path), "--epochs", "2", "--quantize_downsample", "False",
            "--batch_size", "4",
            "--image_size", "32", "--val_resize", "32", "--teacher", "none", "--pretrained", "none", "-j", "0",
            "--no_progress", "--device", "cuda", "--amp", amp, "--channels_last"]
    assert resnet_train.main(argv) == 0
    ckpt = read_checkpoint(tmp_path / "resnet18_2bit_quantize_downsample_False" / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 1 and 0.0 <= ckpt["val_top1"] <= 100.0
    assert all(torch.isfinite(v.float()).all() for v in ckpt["state_dict"].values())
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
