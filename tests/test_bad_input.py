"""Every script against bad input: one clear line, exit 2 for usage errors and 1 for runtime
failures, no traceback unless --debug. Each case here is a row of the table in docs/reliability.md
(same id); ``test_every_documented_row_has_a_test`` keeps the two in step.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from mobilenetv2 import train as mobilenet_train
from mobilenetv2.mobilenet_v2 import MobileNetV2
from n2uq.cli import error_line, run_main
from n2uq.recipe import RESNET_ALPHA_PATTERNS
from resnet import train as resnet_train
from resnet.resnet import resnet18
from scripts import evaluate, export, prepare_demo_data, reproduce_tables
from tests.conftest import REPO_ROOT, make_image_folder, write_idx
from tests.reference_training_file import write_reference_checkpoint

MAINS = {"train": resnet_train.main, "mbv2": mobilenet_train.main, "evaluate": evaluate.main,
         "reproduce": reproduce_tables.main, "export": export.main, "demo": prepare_demo_data.main}
TM = ["--data", "{data}", "--save", "{save}", "--epochs", "2", "--epochs_per_run", "1", "--batch_size", "4",
      "--image_size", "16", "--val_resize", "16", "--teacher", "none", "--pretrained", "none", "-j", "0",
      "--no_progress"]
T = [*TM, "--quantize_downsample", "False"]
E = ["--data", "{data}", "--batch_size", "4", "-j", "0", "--image_size", "16", "--val_resize", "16"]
R = ["--data", "{data}", "--out", "{save}", "--batch_size", "4", "-j", "0", "--image_size", "16", "--val_resize", "16"]
D = ["--out", "{save}", "--source", "{idx}", "--train_per_class", "2", "--val_per_class", "1", "--size", "8"]


def case(id_, script, argv, code, message, env=None):
    return pytest.param(script, argv, code, message, env or {}, id=id_)


CASES = [
    # --- training (resnet/train.py; mobilenetv2/train.py shares the flags and checks) ---
    case("train-data-missing", "train", [*T, "--data", "{tmp}/nope"], 2, "data directory not found: {tmp}/nope"),
    case("train-data-is-a-file", "train", [*T, "--data", "{notckpt}"], 2, "data path is not a directory"),
    case("train-no-train-folder", "train", [*T, "--data", "{only_val}"], 2, "has no train/ folder"),
    case("train-empty-class-folder", "train", [*T, "--data", "{empty_class}"], 2,
         "train: Found no valid file for the classes empty_class"),
    case("train-val-classes-differ", "train", [*T, "--data", "{other_classes}"], 2,
         "train/ and val/ have different class folders"),
    case("train-fewer-images-than-a-batch", "train", [*T, "--batch_size", "32"], 2,
         "has 24 images, fewer than one batch of 32; lower --batch_size"),
    case("train-unknown-arch", "train", [*T, "--student", "resnet19"], 2, "invalid choice: 'resnet19'"),
    case("train-bits-out-of-range", "train", [*T, "--n_bit", "9"], 2, "bits must be an integer in 1..8, got 9"),
    case("train-bits-mobilenet", "mbv2", [*TM, "--n_bit", "0"], 2, "bits must be an integer in 1..8, got 0"),
    case("train-quantize-downsample-value", "train", [*T, "--quantize_downsample", "2"], 2,
         "expected 0, 1, True or False, got '2'"),
    case("train-batch-size-zero", "train", [*T, "--batch_size", "0"], 2, "--batch_size must be positive, got 0"),
    case("train-batch-not-divisible", "train", [*T, "--batch_size", "64"], 2,
         "--batch_size 64 is not divisible by the 3 processes", {"WORLD_SIZE": "3"}),
    case("train-negative-epochs", "train", [*T, "--epochs", "-1"], 2, "--epochs must be positive, got -1"),
    case("train-zero-learning-rate", "train", [*T, "--learning_rate", "0"], 2, "--learning_rate must be positive"),
    case("train-label-smooth-range", "train", [*T, "--label_smooth", "1.5"], 2, "--label_smooth must be in [0, 1)"),
    case("train-negative-workers", "train", [*T, "-j", "-1"], 2, "--workers must be >= 0, got -1"),
    case("train-negative-save-every", "train", [*T, "--save_every_steps", "-5"], 2,
         "--save_every_steps must be >= 0, got -5"),
    case("train-val-resize-below-crop", "train", [*T, "--val_resize", "8"], 2,
         "--val_resize 8 is smaller than --image_size 16"),
    case("train-fp16-on-cpu", "train", [*T, "--amp", "fp16", "--device", "cpu"], 2, "--amp fp16 needs CUDA"),
    case("train-fp16-auto-device-without-cuda", "train", [*T, "--amp", "fp16"], 2,
         "--amp fp16 needs CUDA (--device auto found none)", {"CUDA_VISIBLE_DEVICES": ""}),
    case("train-teacher-none-with-weights", "train", [*T, "--teacher_weights", "{notckpt}"], 2,
         "--teacher none conflicts with --teacher_weights"),
    case("train-full-precision-with-qd", "train", [*T, "--full_precision", "--quantize_downsample", "1"], 2,
         "drop --quantize_downsample or --full_precision"),
    case("train-save-is-a-file", "train", [*T, "--save", "{notckpt}"], 2, "is a file, not a folder"),
    case("train-resume-missing", "train", [*T, "--resume", "{tmp}/gone.pth.tar"], 2,
         "--resume file not found: {tmp}/gone.pth.tar"),
    case("train-resume-not-a-checkpoint", "train", [*T, "--resume", "{notckpt}"], 1,
         "cannot resume: {notckpt} is not a readable PyTorch checkpoint"),
    case("train-resume-empty-file", "train", [*T, "--resume", "{empty}"], 1, "checkpoint file is empty"),
    case("train-resume-truncated", "train", [*T, "--resume", "{truncated}"], 1, "(truncated or corrupt?)"),
    case("train-resume-malicious-pickle", "train", [*T, "--resume", "{evil}"], 1,
         "refusing to load {evil}: it contains Python objects"),
    case("train-resume-other-bits", "train", [*T, "--resume", "{w4a4}"], 2,
         "--resume {w4a4} holds another model (n_bit 4 vs 2: checkpoint vs this run)"),
    case("train-resume-other-classes", "train", [*T, "--resume", "{classes10}"], 2,
         "holds another model (num_classes 10 vs 3"),
    case("train-resume-mid-epoch-other-batch", "train", [*T, "--resume", "{mid_epoch}", "--batch_size", "8"], 2,
         "stopped inside epoch 1 (step 1) and this run differs (--batch_size 4 vs 8"),
    case("train-auto-resume-corrupt", "train", [*T, "--save", "{corrupt_run}"], 1,
         "(truncated or corrupt?)"),
    case("train-resume-reference-other-bits", "train", [*T, "--resume", "{ref_w4a4}"], 2,
         "--resume {ref_w4a4} holds another model (n_bit 4 vs 2: checkpoint vs this run)"),
    case("train-resume-reference-full-precision", "train", [*T, "--resume", "{ref_fp}"], 2,
         "--resume {ref_fp} is not a checkpoint of an N2UQ model (ResNet state dict has no quantizer in 'layer1.0'"),
    case("train-one-epoch-at-lr-0", "train", [*T, "--epochs", "1"], 2,
         "--epochs 1 would train its only epoch at lr 0 and learn nothing"),
    case("train-pretrained-missing", "train", [*T, "--pretrained", "{tmp}/init.pth"], 2,
         "--pretrained file not found"),
    case("train-pretrained-not-a-checkpoint", "train", [*T, "--pretrained", "{notckpt}"], 1,
         "is not a readable PyTorch checkpoint"),
    case("train-pretrained-malicious-pickle", "train", [*T, "--pretrained", "{evil}"], 1, "refusing to load"),
    case("train-teacher-weights-missing", "train", [*T, "--teacher", "resnet18", "--teacher_weights",
                                                    "{tmp}/t.pth"], 1, "--teacher_weights file not found"),
    case("train-save-parent-is-a-file", "train", [*T, "--save", "{notckpt}/runs"], 2,
         "--save {notckpt}/runs: {notckpt} is a file, not a folder"),
    case("train-check-only-empty-class-folder", "train", [*T, "--data", "{empty_class}", "--check_only"], 2,
         "{empty_class}/train: class folder(s) without an image (empty_class;"),
    case("train-unknown-teacher", "train", [*T, "--teacher", "foo"], 2,
         "unknown --teacher 'foo': not a torchvision classification model"),
    case("train-pact-one-bit", "train", [*T, "--method", "pact", "--n_bit", "1"], 2,
         "--method pact needs --n_bit 2 or more"),
    case("train-pretrained-other-architecture", "train", [*T, "--pretrained", "{mbv2}"], 1,
         "{mbv2} does not initialise this model: it fits 0 of its 21 convolution/linear weights (1/370 tensors"),
    case("train-pretrained-deeper-architecture", "train", [*T, "--pretrained", "{resnet34}"], 1,
         "it fits 21 of its 21 convolution/linear weights (122/370 tensors in all; not in the model (16): "
         "layer1.2.conv1.weight"),
    case("train-resume-other-class-folders", "train", [*T, "--data", "{renamed}", "--resume", "{ckpt}"], 2,
         "--resume {ckpt} was trained on other class folders (only in the checkpoint: class_0; only in this run's "
         "data: class_z)"),
    case("train-unreadable-image", "train", [*T, "--data", "{bad_train}"], 1,
         "unreadable image {bad_train}/train/class_1/000.png (UnidentifiedImageError"),
    # --- scripts/evaluate.py ---
    case("evaluate-checkpoint-missing", "evaluate", [*E, "--checkpoint", "{tmp}/x.pth"], 2, "checkpoint not found"),
    case("evaluate-not-a-checkpoint", "evaluate", [*E, "--checkpoint", "{notckpt}"], 1,
         "{notckpt} is not a readable PyTorch checkpoint"),
    case("evaluate-truncated", "evaluate", [*E, "--checkpoint", "{truncated}"], 1, "(truncated or corrupt?)"),
    case("evaluate-malicious-pickle", "evaluate", [*E, "--checkpoint", "{evil}"], 1, "refusing to load"),
    case("evaluate-full-precision-mismatch", "evaluate", [*E, "--checkpoint", "{fp}"], 1,
         "nor is it exactly a torchvision ResNet-18/34/50"),
    case("evaluate-other-class-count", "evaluate", [*E, "--checkpoint", "{classes10}"], 2,
         "has 3 classes but the checkpoint predicts 10"),
    case("evaluate-no-val-folder", "evaluate", [*E, "--checkpoint", "{ckpt}", "--data", "{tmp}"], 2,
         "no val/ folder in {tmp}"),
    case("evaluate-empty-class-folder", "evaluate", [*E, "--checkpoint", "{ckpt}", "--data", "{empty_class}",
                                                     "--split", "train"], 2, "Found no valid file for the classes"),
    case("evaluate-batch-size-zero", "evaluate", [*E, "--checkpoint", "{ckpt}", "--batch_size", "0"], 2,
         "--batch_size must be positive"),
    case("evaluate-negative-image-size", "evaluate", [*E, "--checkpoint", "{ckpt}", "--image_size", "-3"], 2,
         "--image_size must be positive, got -3"),
    case("evaluate-negative-workers", "evaluate", [*E, "--checkpoint", "{ckpt}", "-j", "-2"], 2,
         "--workers must be >= 0"),
    case("evaluate-val-resize-below-crop", "evaluate", [*E, "--checkpoint", "{ckpt}", "--val_resize", "8"], 2,
         "--val_resize 8 is smaller than --image_size 16"),
    case("evaluate-fp16-on-cpu", "evaluate", [*E, "--checkpoint", "{ckpt}", "--amp", "fp16", "--device", "cpu"], 2,
         "--amp fp16 needs CUDA"),
    case("evaluate-unreadable-image", "evaluate", [*E, "--checkpoint", "{ckpt}", "--data", "{bad_val}"], 1,
         "unreadable image {bad_val}/val/class_2/000.png"),
    # --- scripts/reproduce_tables.py ---
    case("reproduce-models-missing", "reproduce", [*R, "--models", "{tmp}/nope"], 2, "--models folder not found"),
    case("reproduce-no-val-folder", "reproduce", [*R, "--models", "{models}", "--data", "{tmp}"], 2,
         "no val/ folder in {tmp}"),
    case("reproduce-batch-size-zero", "reproduce", [*R, "--models", "{models}", "--batch_size", "0"], 2,
         "--batch_size must be positive"),
    case("reproduce-zero-image-size", "reproduce", [*R, "--models", "{models}", "--image_size", "0"], 2,
         "--image_size must be positive"),
    case("reproduce-out-is-a-file", "reproduce", [*R, "--models", "{models}", "--out", "{notckpt}"], 2,
         "--out {notckpt} is a file, not a folder"),
    case("reproduce-bad-files-named", "reproduce", [*R, "--models", "{bad_models}"], 1,
         "refusing to load {bad_models}/evil.pth.tar"),
    # --- scripts/export.py ---
    case("export-checkpoint-missing", "export", ["--checkpoint", "{tmp}/x.pth", "--out", "{save}"], 2,
         "--checkpoint file not found"),
    case("export-not-a-checkpoint", "export", ["--checkpoint", "{notckpt}", "--out", "{save}"], 1,
         "is not a readable PyTorch checkpoint"),
    case("export-malicious-pickle", "export", ["--checkpoint", "{evil}", "--out", "{save}"], 1, "refusing to load"),
    case("export-full-precision-checkpoint", "export", ["--checkpoint", "{fp}", "--out", "{save}"], 1,
         "not an N2UQ quantized model"),
    case("export-unknown-format", "export", ["--checkpoint", "{ckpt}", "--out", "{save}", "--format", "tflite"], 2,
         "--format 'tflite': expected a comma-separated subset of onnx,fast,qonnx,packed"),
    case("export-val-top1-without-data", "export", ["--checkpoint", "{ckpt}", "--out", "{save}", "--val_top1"], 2,
         "--val_top1 needs --data"),
    case("export-zero-image-size", "export", ["--checkpoint", "{ckpt}", "--out", "{save}", "--image_size", "0"], 2,
         "--image_size must be positive, got 0"),
    case("export-out-is-a-file", "export", ["--checkpoint", "{ckpt}", "--out", "{notckpt}"], 2,
         "is a file, not a folder"),
    case("export-data-without-val", "export", ["--checkpoint", "{ckpt}", "--out", "{save}", "--data", "{tmp}"], 2,
         "has no val/ folder"),
    # --- scripts/prepare_demo_data.py ---
    case("demo-size-out-of-range", "demo", [*D, "--size", "4"], 2, "--size must be in 8..512 pixels, got 4"),
    case("demo-count-out-of-range", "demo", [*D, "--train_per_class", "0"], 2,
         "--train_per_class must be in 1..6000"),
    case("demo-source-missing", "demo", [*D, "--source", "{tmp}/nope"], 2, "--source folder not found"),
    case("demo-source-not-idx", "demo", [*D, "--source", "{not_idx}"], 2, "not an idx uint8 file"),
    case("demo-out-not-empty", "demo", [*D, "--out", "{tmp}"], 2, "already exists and is not empty; pass --overwrite"),
    case("demo-out-is-a-file", "demo", [*D, "--out", "{notckpt}"], 2, "is a file, not a folder"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every bad (and the few good) inputs the cases refer to, built once."""
    root = tmp_path_factory.mktemp("inputs")
    p = {"tmp": root}
    p["data"] = make_image_folder(root / "data", classes=3, train_per_class=8, val_per_class=[3, 2, 2], size=16)
    p["only_val"] = root / "only_val"
    shutil.copytree(p["data"] / "val", p["only_val"] / "val")
    p["empty_class"] = root / "empty_class"
    shutil.copytree(p["data"], p["empty_class"])
    (p["empty_class"] / "train" / "empty_class").mkdir()
    p["other_classes"] = root / "other_classes"
    shutil.copytree(p["data"], p["other_classes"])
    (p["other_classes"] / "val" / "class_2").rename(p["other_classes"] / "val" / "class_9")
    p["renamed"] = root / "renamed"  # every label shifts: class_z sorts last
    shutil.copytree(p["data"], p["renamed"])
    for split in ("train", "val"):
        (p["renamed"] / split / "class_0").rename(p["renamed"] / split / "class_z")
    for name, rel in (("bad_train", "train/class_1/000.png"), ("bad_val", "val/class_2/000.png")):
        p[name] = root / name
        shutil.copytree(p["data"], p[name])
        (p[name] / rel).write_bytes(b"this is not a PNG")

    p["notckpt"] = root / "notes.txt"
    p["notckpt"].write_text("hello, not a checkpoint\n")
    p["empty"] = root / "empty.pth.tar"
    p["empty"].write_bytes(b"")

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'pwned'}",))

    p["evil"] = root / "evil.pth.tar"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "payload": Exploit()}, p["evil"])

    save = root / "trained"
    assert resnet_train.main([a.format(data=p["data"], save=save) for a in T]) == 0
    p["ckpt"] = save / "resnet18_2bit_quantize_downsample_False" / "checkpoint.pth.tar"
    mid = root / "mid"
    assert resnet_train.main([*[a.format(data=p["data"], save=mid) for a in T], "--steps_per_run", "1"]) == 0
    p["mid_epoch"] = mid / "resnet18_2bit_quantize_downsample_False" / "checkpoint.pth.tar"
    p["truncated"] = root / "truncated.pth.tar"
    p["truncated"].write_bytes(p["ckpt"].read_bytes()[:100_000])
    p["corrupt_run"] = root / "corrupt_run"
    (p["corrupt_run"] / "resnet18_2bit_quantize_downsample_False").mkdir(parents=True)
    shutil.copy(p["truncated"], p["corrupt_run"] / "resnet18_2bit_quantize_downsample_False" / "checkpoint.pth.tar")
    p["w4a4"] = root / "w4a4.pth.tar"
    torch.save({"state_dict": resnet18(4, False, 3).state_dict()}, p["w4a4"])
    p["ref_w4a4"] = root / "reference_w4a4.pth.tar"  # as the reference's training script writes it
    write_reference_checkpoint(resnet18(4, False, 3), p["ref_w4a4"], RESNET_ALPHA_PATTERNS, epoch=3, image_size=16)
    p["ref_fp"] = root / "reference_fp.pth.tar"
    write_reference_checkpoint(torchvision.models.resnet18(num_classes=3), p["ref_fp"], (), epoch=3, image_size=16)
    p["classes10"] = root / "classes10.pth.tar"
    torch.save({"state_dict": resnet18(2, False, 10).state_dict()}, p["classes10"])
    p["fp"] = root / "torchvision_resnet18.pth"
    fp = torchvision.models.resnet18(num_classes=3).state_dict()
    del fp["layer4.1.bn2.running_var"]  # a complete one is evaluated (tests/test_scripts_train.py)
    torch.save(fp, p["fp"])
    p["mbv2"] = root / "mobilenetv2.pth.tar"
    torch.save(MobileNetV2(4, 3).state_dict(), p["mbv2"])
    p["resnet34"] = root / "resnet34.pth"
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), p["resnet34"])
    p["models"] = root / "models"
    p["models"].mkdir()
    p["bad_models"] = root / "bad_models"
    p["bad_models"].mkdir()
    shutil.copy(p["evil"], p["bad_models"] / "evil.pth.tar")

    p["idx"] = root / "idx"
    p["idx"].mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("val", 20)):
        write_idx(p["idx"], rng.integers(0, 255, (n, 28, 28)), np.arange(n) % 10, split)
    p["not_idx"] = root / "not_idx"
    p["not_idx"].mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (p["not_idx"] / name).write_bytes(b"\x00\x00\x00\x00garbage")
    return p


@pytest.mark.parametrize("script, argv, code, message, env", CASES)
def test_bad_input(script, argv, code, message, env, inputs, tmp_path, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    values = {**{k: str(v) for k, v in inputs.items()}, "save": str(tmp_path / "out")}
    argv = [a.format(**values) for a in argv]
    with pytest.raises(SystemExit) as exc:
        run_main(MAINS[script], argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == code, err
    assert message.format(**values) in lines[0], err
    assert "Traceback" not in err
    if script != "reproduce":  # reproduce_tables names every bad file, one line each
        assert len(lines) == 1, err
    assert all(re.match(r"(\S+: )?error: ", ln) for ln in lines), err
    assert not (inputs["tmp"] / "pwned").exists()  # the malicious pickle never ran


def test_debug_shows_the_traceback(inputs, tmp_path):
    argv = [a.format(data=inputs["data"], save=tmp_path) for a in T] + ["--resume", str(inputs["notckpt"]),
                                                                          "--debug"]
    with pytest.raises(Exception, match="is not a readable PyTorch checkpoint") as info:
        run_main(resnet_train.main, argv)
    assert not isinstance(info.value, SystemExit)


def test_scripts_exit_codes_as_processes(inputs):
    """The real process: exit status, a single stderr line, no traceback (usage errors as processes:
    ``test_run_sh_rejects_bad_arguments``, ``test_reproduce_tables.py::test_bad_arguments``)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "--checkpoint",
                           str(inputs["evil"]), "--data", str(inputs["data"])], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: refusing to load") and "Traceback" not in proc.stderr
    assert not (inputs["tmp"] / "pwned").exists()


def test_no_space_left_while_writing_demo_data(inputs, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    argv = [a.format(save=tmp_path / "demo", idx=inputs["idx"]) for a in D]
    with pytest.raises(SystemExit) as exc:
        run_main(prepare_demo_data.main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"error: no space left on the device ({tmp_path / 'demo' / 'train'}" in err
    assert "free some space or write elsewhere, then run again" in err


def test_error_line_formats_os_errors():
    assert error_line(OSError(errno.ENOSPC, "No space left on device")) == (
        "no space left on the device: free some space or write elsewhere, then run again")
    assert error_line(PermissionError(errno.EACCES, "Permission denied", "/x")) == "Permission denied (/x)"
    assert error_line(ValueError("two\n  lines")) == "two lines"
    assert error_line(RuntimeError("")) == "RuntimeError"


def test_every_documented_row_has_a_test():
    """docs/reliability.md: each table row names a case above or a test function that exists."""
    doc = (REPO_ROOT / "docs" / "reliability.md").read_text()
    ids = {c.id for c in CASES}
    functions = {name for path in (REPO_ROOT / "tests").glob("test_*.py")
                 for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    rows = re.findall(r"^\|.*\|\s*`([^`]+)`\s*\|\s*$", doc, re.M)
    assert len(rows) >= 15
    for test in rows:
        name = test.split("::")[-1]
        assert name in ids or name in functions, f"docs/reliability.md names {test}, which is not a test"
    assert ids <= {t.split("::")[-1] for t in rows}, "a case of test_bad_input.py is missing from the doc"


def test_evaluation_flags_never_contradict_the_checkpoint(inputs, capsys):
    """A flag that contradicts the preprocessing a checkpoint records is refused on one line naming
    it (no number printed); the result line states the preprocessing it used, the recorded one."""
    base = [a.format(data=inputs["data"]) for a in E[:6]] + ["--checkpoint", str(inputs["ckpt"])]
    for flags, named in ((["--image_size", "24"], "--image_size 24"), (["--val_resize", "20"], "--val_resize 20"),
                         (["--amp", "bf16"], "--amp bf16")):
        with pytest.raises(SystemExit) as exc:
            run_main(evaluate.main, [*base, *flags])
        out, err = capsys.readouterr()
        assert exc.value.code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: {inputs['ckpt']}: was trained with ") and named in err
        assert f"leave {named.split()[0]} out to evaluate it as trained" in err
    with pytest.raises(SystemExit) as exc:
        run_main(evaluate.main, base)
    assert exc.value.code == 0 and "on 7 images, crop 16 after resize 16" in capsys.readouterr().out
