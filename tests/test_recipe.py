"""SPEC §6 recipe: parameter-group membership under the reference's name rules, and the schedule."""

from __future__ import annotations

import pytest
import torch

from mobilenetv2.mobilenet_v2 import MobileNetV2
from n2uq.recipe import (
    MOBILENETV2_ALPHA_PATTERNS,
    RESNET_ALPHA_PATTERNS,
    build_optimizer,
    build_scheduler,
    lr_at_epoch,
    scheduler_step,
    split_parameters,
)
from resnet.resnet import resnet18, resnet50


def reference_groups(model, patterns):
    """The reference's rule, written out independently: weights = 4-D without 'bias' in the name;
    alpha = any pattern in the name; other = the rest; frozen parameters are not optimised."""
    alpha, weights, other = set(), set(), set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(pat in name for pat in patterns):
            alpha.add(name)
        elif p.ndimension() == 4 and "bias" not in name:
            weights.add(name)
        else:
            other.add(name)
    return {"alpha": alpha, "weights": weights, "other": other}


def names(groups):
    return {k: {n for n, _ in v} for k, v in groups.items()}


CASES = [
    ("resnet18", lambda: resnet18(2, False, 10), RESNET_ALPHA_PATTERNS),
    ("resnet50_qd", lambda: resnet50(2, True, 10), RESNET_ALPHA_PATTERNS),
    ("mobilenetv2", lambda: MobileNetV2(4, 10), MOBILENETV2_ALPHA_PATTERNS),
]


@pytest.mark.parametrize("label,build,patterns", CASES, ids=[c[0] for c in CASES])
def test_groups_follow_reference_rules(label, build, patterns):
    model = build()
    got = names(split_parameters(model, patterns))
    assert got == reference_groups(model, patterns)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*got.values()) == trainable
    assert sum(len(v) for v in got.values()) == len(trainable)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.endswith(("clip_val", "zero")) for n in frozen)


def test_group_membership_examples():
    r18 = names(split_parameters(resnet18(2, False, 10), RESNET_ALPHA_PATTERNS))
    alpha = {"layer1.0.quan1.a", "layer1.0.quan2.start", "layer1.0.quan1.scale1", "layer4.1.quan2.scale2"}
    assert alpha <= r18["alpha"]
    assert {"layer1.0.conv1.weight", "conv1.weight", "layer2.0.downsample.0.weight"} <= r18["weights"]
    assert {"layer1.0.bias11.bias", "layer1.0.prelu1.weight", "bn1.weight", "fc.weight", "fc.bias"} <= r18["other"]

    r50 = names(split_parameters(resnet50(2, True, 10), RESNET_ALPHA_PATTERNS))
    # The reference quirk: quan3.a and downsample.0.a train at the full lr.
    assert {"layer1.0.quan3.a", "layer1.0.downsample.0.a"} <= r50["other"]
    assert {"layer1.0.quan3.start", "layer1.0.downsample.0.start", "layer1.0.downsample.0.scale1"} <= r50["alpha"]
    assert "layer1.0.downsample.1.weight" in r50["weights"]
    switched = names(split_parameters(resnet50(2, True, 10), RESNET_ALPHA_PATTERNS, all_ltq_a=True))
    assert {"layer1.0.quan3.a", "layer1.0.downsample.0.a"} <= switched["alpha"]
    assert not any(n.endswith(".a") for n in switched["other"])

    mb = names(split_parameters(MobileNetV2(4, 10), MOBILENETV2_ALPHA_PATTERNS))
    assert {"feature.1.quan3.a", "feature.5.quan1.a", "feature.5.quan2.start"} <= mb["alpha"]
    assert {"feature.18.quan1.clip_val", "fc.weight"} <= mb["other"]
    assert {"feature.0.conv1.weight", "feature.3.conv2.weight", "feature.18.conv1.weight"} <= mb["weights"]


def test_optimizer_groups_and_lr_per_epoch():
    model = resnet18(2, False, 10)
    epochs, lr, wd = 4, 1.25e-3, 5e-5
    opt = build_optimizer(model, lr, wd, alpha_patterns=RESNET_ALPHA_PATTERNS)
    assert [g["name"] for g in opt.param_groups] == ["alpha", "other", "weights"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0, wd]
    assert opt.defaults["betas"] == (0.9, 0.999)
    sched = build_scheduler(opt, epochs)
    for epoch in range(epochs):
        scheduler_step(sched)  # at the start of every epoch
        expected = lr_at_epoch(lr, epoch, epochs)
        assert expected == pytest.approx(lr * (1 - (epoch + 1) / epochs))
        got = {g["name"]: g["lr"] for g in opt.param_groups}
        assert got["alpha"] == pytest.approx(expected / 10, abs=1e-15)
        assert got["other"] == pytest.approx(expected, abs=1e-15)
        assert got["weights"] == pytest.approx(expected, abs=1e-15)
    assert all(g["lr"] == 0 for g in opt.param_groups)  # the last epoch trains at lr 0


def test_frozen_parameters_never_change():
    model = resnet18(2, False, 3)
    opt = build_optimizer(model, 1e-2, 1e-2)
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.layer1[0].conv1.clip_val) not in optimised
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    opt.step()
    assert model.layer1[0].conv1.clip_val.item() == 2.0
