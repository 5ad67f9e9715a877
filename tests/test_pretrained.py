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


def test_a_file_that_does_not_initialise_the_architecture_is_refused():
    """Some keys fitting is not enough: every convolution and linear weight of the model must come from
    the file (the classifier may have another class count), and the file may hold no others."""
    from mobilenetv2.mobilenet_v2 import MobileNetV2

    with pytest.raises(PretrainedError, match=r"mbv2 does not initialise this model: it fits 0 of its 21 "
                                              r"convolution/linear weights \(1/370 tensors in all; shape differs"):
        load_matching(resnet18(2, False, 10), MobileNetV2(4, 10).state_dict(), "mbv2")
    with pytest.raises(PretrainedError, match=r"fits 21 of its 21 .*not in the model \(16\): layer1.2.conv1.weight"):
        load_matching(resnet18(2, True, 10), torchvision.models.resnet34(num_classes=10).state_dict(), "r34")
    trained = resnet18(4, True, 10).state_dict()  # another N2UQ model: only the shortcut layout differs
    with pytest.raises(PretrainedError, match=r"not in the file \(3\): layer2.0.downsample.0.weight"):
        load_matching(resnet18(2, False, 10), trained, "qd")
    model = resnet18(2, True, 7)  # a quantized model from the same architecture's file, 10 -> 7 classes
    report = load_matching(model, trained, "qd")
    assert "fc.weight" in report.left_at_init and "layer1.0.conv1.weight" in report.loaded
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], trained["layer4.1.conv2.weight"])
    with pytest.raises(PretrainedError, match="fits 20 of its 21"):  # a classifier of another input width
        load_matching(resnet18(2, False, 10), {**torchvision.models.resnet18(num_classes=10).state_dict(),
                                               "fc.weight": torch.zeros(10, 256)}, "narrow")


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


@pytest.fixture
def offline(monkeypatch):
    """gdown fails as without network; the calls are counted."""
    from n2uq import pretrained

    calls = []

    def no_network(file_id, path):
        calls.append(path)
        raise pretrained._FetchFailed("no network")

    monkeypatch.setattr(pretrained, "_gdown", no_network)
    return calls


def test_authors_file_is_found_in_save_as_the_reference_keeps_it(tv_file, tmp_path, offline):
    """real_res18.pth.tar under --save (where the reference looks), none under --models_dir."""
    save, models = tmp_path / "runs", tmp_path / "models"
    save.mkdir()
    torch.save({"state_dict": torch.load(tv_file, weights_only=True)}, save / "real_res18.pth.tar")
    report = load_pretrained(resnet18(2, True, 10), "authors", "resnet18", True, str(models), str(save))
    assert report.source == str(save / "real_res18.pth.tar") and report.loaded and not offline
    (models).mkdir()
    torch.save({"state_dict": torch.load(tv_file, weights_only=True)}, models / "real_res18.pth.tar")
    report = load_pretrained(resnet18(2, True, 10), "authors", "resnet18", True, str(models), str(save))
    assert report.source == str(models / "real_res18.pth.tar")  # --models_dir first


def test_torchvision_file_beside_the_runs_is_used_without_download(tv_file, tmp_path, offline, monkeypatch):
    from n2uq import pretrained

    monkeypatch.setattr(pretrained, "torchvision_state_dict", lambda *a: pytest.fail("downloaded"))
    (tmp_path / "resnet18-f37072fd.pth").write_bytes(tv_file.read_bytes())
    report = load_pretrained(resnet18(2, False, 10), "torchvision", "resnet18", False, str(tmp_path / "m"),
                             str(tmp_path))
    assert report.source == str(tmp_path / "resnet18-f37072fd.pth") and "layer1.0.conv1.weight" in report.loaded


def test_missing_init_file_names_both_folders_and_the_command(tmp_path, offline):
    save, models = tmp_path / "runs", tmp_path / "models"
    with pytest.raises(PretrainedError) as exc:
        load_pretrained(resnet18(2, True, 10), "authors", "resnet18", True, str(models), str(save))
    msg = str(exc.value)
    assert msg.startswith(f"real_res18.pth.tar is not in {models} (--models_dir) nor in {save} (--save), and "
                          f"fetching it failed (no network)")
    assert (f"`python scripts/download_pretrained.py --arch resnet18 --quantize_downsample 1 --models_dir {models}`"
            in msg)
    assert "drive.google.com/uc?id=1BfWhr1hzaS_5zHpQDREVRiPOCmXEWC7q" in msg and "\n" not in msg
    assert offline == [str(models / "real_res18.pth.tar")]  # fetched into --models_dir
    with pytest.raises(PretrainedError, match=r"real_mbv2.pth.tar is not in .* \(--models_dir, also --save\).*"
                                              r"--arch mobilenetv2 --models_dir"):
        load_pretrained(resnet18(2, True, 10), "authors", "mobilenetv2", False, str(models), str(models))
