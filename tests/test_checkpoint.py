"""Checkpoint reading: reference formats, strict loading, key reports, config inference, safety."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from n2uq.checkpoint import (
    CheckpointError,
    ModelConfig,
    StateDictMismatchError,
    extract_state_dict,
    infer_config,
    load_model_state,
    load_state_dict_strict,
    read_checkpoint,
)
from scripts.model_zoo import build_model
from tests.test_models import LAYOUTS, build_from_tag


def _config_from_tag(tag: str) -> ModelConfig:
    if tag.startswith("mobilenetv2"):
        return ModelConfig("mobilenetv2", int(tag.split("_")[1][1]), False, 1000)
    arch, bits, qd = tag.split("_")
    return ModelConfig(arch, int(bits[1]), qd == "qd1", 1000)


def _save_reference_style(model, path, prefix="module."):
    """What the reference's training script wrote: DataParallel keys, Adam state, a tensor accuracy."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.save(
        {
            "epoch": 3,
            "state_dict": {prefix + k: v for k, v in model.state_dict().items()},
            "best_top1_acc": torch.tensor(61.25),
            "optimizer": opt.state_dict(),
        },
        path,
    )


@pytest.mark.parametrize("tag", sorted(LAYOUTS))
def test_infer_config_names_every_configuration(tag):
    fake = {name: torch.empty(shape) for name, shape in LAYOUTS[tag]}
    assert infer_config(fake) == _config_from_tag(tag)
    assert infer_config({"module." + k: v for k, v in fake.items()}) == _config_from_tag(tag)
    assert _config_from_tag(tag).tag == tag


def test_infer_config_num_classes_and_model_roundtrip():
    cfg = ModelConfig("resnet34", 3, True, 17)
    model = build_model(cfg)
    assert infer_config(model.state_dict()) == cfg


def test_reference_checkpoint_loads_strictly_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_from_tag("resnet18_w2a2_qd0", num_classes=1000).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "start"):
                m.start.fill_(-0.05)
    path = tmp_path / "res18_2bit.pth.tar"
    _save_reference_style(model, path)

    state, cfg, meta = load_model_state(path)
    assert cfg == ModelConfig("resnet18", 2, False, 1000)
    assert meta["epoch"] == 3 and float(meta["best_top1_acc"]) == 61.25
    assert not any(k.startswith("module.") for k in state)

    fresh = build_model(cfg).eval()
    load_state_dict_strict(fresh, state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # Round trip: saving the loaded model again gives the same tensors.
    again = tmp_path / "again.pth"
    torch.save({"state_dict": fresh.state_dict()}, again)
    state2, _, _ = load_model_state(again)
    assert state2.keys() == state.keys() and all(torch.equal(state[k], state2[k]) for k in state)


def test_raw_state_dict_and_compiled_prefix_accepted(tmp_path):
    model = build_from_tag("mobilenetv2_w4a4", num_classes=10)
    path = tmp_path / "raw.pth"
    torch.save({"_orig_mod." + k: v for k, v in model.state_dict().items()}, path)
    state, cfg, _ = load_model_state(path)
    assert cfg == ModelConfig("mobilenetv2", 4, False, 10)
    load_state_dict_strict(build_model(cfg), state)


def test_other_configuration_fails_with_key_report():
    src = build_from_tag("resnet18_w2a2_qd1").state_dict()
    target = build_from_tag("resnet18_w4a4_qd0")
    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict_strict(target, src, source="res18_2bit_qd1.pth")
    msg = str(info.value)
    assert "res18_2bit_qd1.pth does not match" in msg
    assert "missing keys (15)" in msg and "unexpected keys (" in msg and "shape mismatches (" in msg
    assert "quan1.a checkpoint [3] vs model [15]" in msg
    assert "looks like resnet18_w2a2_qd1" in msg
    assert "layer2.0.downsample.2.weight" in info.value.unexpected
    assert "layer2.0.downsample.0.weight" in info.value.missing
    # The report shows at most five of each kind, with the total count.
    assert "more)" in msg

    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict_strict(build_from_tag("resnet18_w2a2_qd1"), build_from_tag("resnet18_w2a2_qd0").state_dict())
    assert "missing keys (" in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pth.tar.*arbitrary code"):
        read_checkpoint(path)
    assert not marker.exists()

    legacy = tmp_path / "legacy.pkl"  # a plain (non-zip) pickle with the same payload
    with open(legacy, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(CheckpointError):
        read_checkpoint(legacy)
    assert not marker.exists()


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda p: None, "not found"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("hello, not a checkpoint"), "not a readable PyTorch checkpoint"),
    ],
)
def test_unreadable_paths_give_clear_errors(tmp_path, make, pattern):
    path = tmp_path / "ckpt.pth"
    make(path)
    with pytest.raises(CheckpointError, match=pattern):
        read_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "full.pth"
    torch.save(build_from_tag("resnet18_w2a2_qd0").state_dict(), path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth is not a readable PyTorch checkpoint"):
        read_checkpoint(cut)


@pytest.mark.parametrize(
    "state, pattern",
    [
        ({"conv.weight": torch.zeros(3)}, "no 2-D 'fc.weight'"),
        ({"fc.weight": torch.zeros(10, 512), "layer1.0.conv1.weight": torch.zeros(1)}, "unrecognised ResNet layout"),
        ({"fc.weight": torch.zeros(10, 5), "feature.0.conv1.weight": torch.zeros(1)}, "MobileNetV2"),
    ],
)
def test_unrecognised_state_dicts(state, pattern):
    with pytest.raises(CheckpointError, match=pattern):
        infer_config(state)


def test_full_precision_resnet_is_not_taken_for_n2uq():
    import torchvision

    sd = torchvision.models.resnet18().state_dict()
    with pytest.raises(CheckpointError, match="not an N2UQ quantized model"):
        infer_config(sd)


def test_bad_level_count_and_empty_containers(tmp_path):
    fake = {name: torch.empty(shape) for name, shape in LAYOUTS["resnet18_w2a2_qd0"]}
    fake["layer1.0.quan1.a"] = torch.empty(4)
    with pytest.raises(CheckpointError, match="2\\^b - 1"):
        infer_config(fake)
    with pytest.raises(CheckpointError, match="no model state dict"):
        extract_state_dict({"epoch": 1})
    path = tmp_path / "opt_only.pth"
    torch.save({"epoch": 1, "optimizer": {}}, path)
    with pytest.raises(CheckpointError, match="opt_only.pth holds no model state dict"):
        load_model_state(path)
