"""--pretrained: torchvision-layout files load with a report; the quantized-downsample remap."""

from __future__ import annotations

import pytest
import torch
import torchvision

from n2uq.pretrained import PretrainedError, fetch_torchvision_weights, load_matching, load_pretrained
from resnet.resnet import resnet18


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "resnet18_tv.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


def test_torchvision_file_into_quantized_downsample_layout(tv_file):
    tv = torch.load(tv_file, weights_only=True)
    model = resnet18(2, True, 10)
    report = load_pretrained(model, str(tv_file), "resnet18", True)
    own = model.state_dict()
    assert report.remapped == 3 * 6  # 3 shortcuts × (conv weight + 5 BN entries)
    assert torch.equal(own["layer2.0.downsample.1.weight"], tv["layer2.0.downsample.0.weight"])
    assert torch.equal(own["layer2.0.downsample.2.running_var"], tv["layer2.0.downsample.1.running_var"])
    assert torch.equal(own["layer1.0.conv1.weight"], tv["layer1.0.conv1.weight"])
    assert torch.equal(own["fc.weight"], tv["fc.weight"])
    assert len(report.loaded) == len(tv) and not report.unused and not report.shape_mismatch
    assert "layer1.0.quan1.a" in report.left_at_init and "layer2.0.downsample.0.start" in report.left_at_init
    summary = report.summary()
    assert f"loaded {len(tv)}/{len(own)}" in summary and "left at init" in summary and "*.a x" in summary


def test_torchvision_file_fp_downsample_and_shape_mismatch(tv_file):
    model = resnet18(2, False, 7)  # 7 classes: fc does not fit
    report = load_pretrained(model, str(tv_file), "resnet18", False)
    assert report.remapped == 0
    assert "layer2.0.downsample.1.running_mean" in report.loaded
    assert {m.split()[0] for m in report.shape_mismatch} == {"fc.weight", "fc.bias"}
    assert "fc.weight" in report.left_at_init and "shape differs" in report.summary()


def test_nothing_matching_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(PretrainedError, match="no key of the file matches"):
        load_pretrained(resnet18(2, False, 10), str(path), "resnet18", False)
    with pytest.raises(PretrainedError, match="no key"):
        load_matching(resnet18(2, False, 10), {}, "empty")


def test_unavailable_torchvision_weights_say_where_to_put_them():
    class Offline:
        url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"

        def get_state_dict(self, progress=False):
            raise OSError("<urlopen error [Errno -2] Name or service not known>")

        def __str__(self):
            return "ResNet18_Weights.IMAGENET1K_V1"

    with pytest.raises(PretrainedError) as exc:
        fetch_torchvision_weights(Offline(), "--pretrained none")
    msg = str(exc.value)
    assert "resnet18-f37072fd.pth" in msg and "hub/checkpoints" in msg and "--pretrained none" in msg
    assert "\n" not in msg
