"""Model layouts against the reference's state dicts, and whole-model behaviour.

The fast paths of whole models against the definitions: tests/test_backends.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mobilenetv2.mobilenet_v2 import MobileNetV2
from n2uq import LTQ, HardQuantizeConv
from resnet.resnet import ARCHS

LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "state_dict_layouts.json").read_text())


def build_from_tag(tag: str, num_classes: int = 1000) -> nn.Module:
    if tag.startswith("mobilenetv2"):
        return MobileNetV2(int(tag.split("_")[1][1]), num_classes)
    arch, bits, qd = tag.split("_")
    return ARCHS[arch](int(bits[1]), qd == "qd1", num_classes)


def test_fixture_covers_all_19_configurations():
    assert len(LAYOUTS) == 19


@pytest.mark.parametrize("tag", sorted(LAYOUTS))
def test_state_dict_layout_matches_reference(tag):
    model = build_from_tag(tag)
    got = [[name, list(t.shape)] for name, t in model.state_dict().items()]
    assert got == LAYOUTS[tag], f"{tag}: keys, shapes or order differ from the reference"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("qd", [False, True])
def test_resnet_forward_and_downsample_kind(arch, qd):
    model = ARCHS[arch](2, qd, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    ds = model.layer2[0].downsample
    if qd:
        assert isinstance(ds[0], LTQ) and isinstance(ds[1], HardQuantizeConv) and isinstance(ds[2], nn.BatchNorm2d)
    else:
        assert type(ds[0]) is nn.Conv2d and isinstance(ds[1], nn.BatchNorm2d)


def test_resnet_init_follows_reference():
    torch.manual_seed(0)
    model = ARCHS["resnet18"](2, False)
    std = model.conv1.weight.std().item()
    fan_out = 64 * 7 * 7
    assert std == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)  # kaiming normal, fan_out, relu
    assert model.layer1[0].conv1.weight.abs().max() <= 0.0005  # HardQuantizeConv keeps its own init
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    assert torch.all(model.layer1[0].prelu1.weight == 0.25)


def test_mobilenetv2_structure_and_forward():
    model = MobileNetV2(4, num_classes=10).eval()
    strides = [blk.conv2.stride for blk in model.feature[1:18]]
    assert [i + 1 for i, s in enumerate(strides) if s == 2] == [2, 4, 7, 14]
    residual = [i + 1 for i, blk in enumerate(model.feature[1:18]) if blk.use_residual]
    assert residual == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    assert model.feature[1].conv2.groups == 32 and model.feature[2].conv2.groups == 96
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # small inputs pool globally


def test_bits_out_of_range_are_rejected():
    with pytest.raises(ValueError, match="n_bit"):
        ARCHS["resnet18"](9, False)
    with pytest.raises(ValueError, match="n_bit"):
        MobileNetV2(0)


def _randomise(model: nn.Module, seed: int) -> None:
    """Trained-looking state: LTQ thresholds, scales, BN statistics, PReLU slopes, biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LTQ):
                m.start.uniform_(-0.3, 0.1, generator=g)
                m.a.copy_(torch.rand(m.a.shape, generator=g) * 2 * m.interval + 0.01)
                m.scale1.uniform_(0.6, 1.4, generator=g)
                m.scale2.uniform_(0.6, 1.4, generator=g)
            elif isinstance(m, HardQuantizeConv):
                m.weight.normal_(0, 0.05, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.2, 0.5, generator=g)
        for name, p in model.named_parameters():
            if name.endswith(".bias") and p.dim() == 4:
                p.normal_(0, 0.05, generator=g)
