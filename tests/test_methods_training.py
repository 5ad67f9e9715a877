"""The compared methods and N2UQ's ablations through the one training engine and the scripts:
run folders and checkpoints record the method, evaluation and the tables read it back from the
file, export refuses what it does not cover, bad combinations give one line."""

from __future__ import annotations

import pytest
import torch

from mobilenetv2 import train as mobilenet_train
from n2uq.checkpoint import infer_config, load_model_state, read_checkpoint
from n2uq.cli import run_main
from n2uq.recipe import build_optimizer
from resnet import train as resnet_train
from resnet.resnet import resnet18
from scripts import evaluate as evaluate_script
from scripts import export as export_script
from scripts.model_zoo import load_checkpoint_model

TINY = ["--epochs", "2", "--batch_size", "6", "--image_size", "16", "--val_resize", "16", "--teacher", "none",
        "--pretrained", "none", "-j", "0", "--no_progress", "--quantize_downsample", "0"]


def _train(main, data, save, *flags):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["--data", str(data), "--save", str(save), *TINY, *flags])
    return exit_info.value.code


@pytest.fixture(scope="module")
def runs(tiny_imagefolder, tmp_path_factory):
    save = tmp_path_factory.mktemp("method_runs")
    for flags in (["--method", "lsq"], ["--uniform_thresholds", "--maxabs_weights"]):
        assert _train(resnet_train.main, tiny_imagefolder, save, *flags) == 0
    return save


def test_run_folders_and_checkpoints_record_the_method(runs):
    lsq = read_checkpoint(runs / "resnet18_lsq_2bit_quantize_downsample_False" / "checkpoint.pth.tar")
    assert lsq["config"]["method"] == "lsq" and lsq["config"]["quantizers"]["method"] == "lsq"
    ablation_dir = runs / "resnet18_n2uq-uniform-thresholds-maxabs-weights_2bit_quantize_downsample_False"
    ablation = read_checkpoint(ablation_dir / "checkpoint.pth.tar")
    assert ablation["config"]["quantizers"] == {"n_bit": 2, "method": "n2uq", "learned_thresholds": False,
                                                "entropy_preserving": False, "full_lr_thresholds": False}
    model, tag, _ = load_checkpoint_model(str(ablation_dir / "model_best.pth.tar"))
    assert tag == "resnet18_n2uq-uniform-thresholds-maxabs-weights_w2a2_qd0"
    assert all(not m.a.requires_grad for n, m in model.named_modules() if n.endswith("quan1"))
    a = ablation["state_dict"]["module.layer1.0.quan1.a"]
    assert torch.equal(a, torch.full_like(a, 2 / 3))  # the thresholds never left the uniform grid


def test_evaluate_reads_the_method_from_the_file(runs, tiny_imagefolder, capsys):
    ckpt = runs / "resnet18_lsq_2bit_quantize_downsample_False" / "model_best.pth.tar"
    with pytest.raises(SystemExit) as exit_info:
        run_main(evaluate_script.main, ["--checkpoint", str(ckpt), "--data", str(tiny_imagefolder), "-j", "0"])
    assert exit_info.value.code == 0
    assert "resnet18_lsq_w2a2_qd0 [resnet18 W2A2, lsq, FP downsample, 3 classes]" in capsys.readouterr().out


def test_export_refuses_a_compared_method_in_one_line(runs, tmp_path, capsys):
    ckpt = runs / "resnet18_lsq_2bit_quantize_downsample_False" / "model_best.pth.tar"
    with pytest.raises(SystemExit) as exit_info:
        run_main(export_script.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "is a lsq model: integer export covers N2UQ models" in err


def test_resuming_a_run_of_another_method_is_refused(runs, tiny_imagefolder, capsys):
    ckpt = runs / "resnet18_lsq_2bit_quantize_downsample_False" / "checkpoint.pth.tar"
    assert _train(resnet_train.main, tiny_imagefolder, runs, "--method", "dorefa", "--resume", str(ckpt)) == 2
    assert "holds another model (method lsq vs dorefa" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--method", "apot"], "invalid choice: 'apot'"),
    (["--method", "lsq", "--uniform_thresholds"], "--uniform_thresholds is an ablation of N2UQ"),
    (["--method", "dorefa", "--maxabs_weights"], "--maxabs_weights is an ablation of N2UQ"),
    (["--method", "lsq", "--pact_alpha_decay", "1e-3"], "--pact_alpha_decay applies to --method pact only"),
    (["--method", "lsq", "--n_bit", "1"], "--method lsq needs --n_bit 2 or more"),
    (["--full_precision", "--method", "lsq"], "--full_precision trains a model without quantizers"),
])
def test_flags_that_do_not_apply_are_one_line_errors(tiny_imagefolder, tmp_path, capsys, flags, message):
    assert _train(resnet_train.main, tiny_imagefolder, tmp_path, "--check_only", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_mobilenetv2_trains_a_compared_method_in_its_own_folder(tiny_imagefolder, tmp_path):
    flags = TINY[: TINY.index("--quantize_downsample")] + ["--epochs_per_run", "1"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(mobilenet_train.main, ["--data", str(tiny_imagefolder), "--save", str(tmp_path), *flags,
                                        "--method", "pact", "--image_size", "32", "--val_resize", "32"])
    assert exit_info.value.code == 0
    ckpt = tmp_path / "mobilenetv2_pact_4bit" / "checkpoint.pth.tar"
    state_dict, config, _ = load_model_state(ckpt)
    assert (config.arch, config.method, config.n_bit) == ("mobilenetv2", "pact", 4)
    assert "feature.1.quan1.clip_alpha" in state_dict


def test_infer_config_tells_methods_apart_and_needs_their_bits():
    for method in ("lsq", "pact", "dorefa"):
        from n2uq.methods import Quantizers

        sd = resnet18(3, True, 10, Quantizers(3, method)).state_dict()
        config = infer_config(sd, {"config": {"quantizers": {"n_bit": 3, "method": method}}})
        assert (config.method, config.n_bit, config.quantize_downsample) == (method, 3, True)
        with pytest.raises(Exception, match="bit width the file does not record"):
            infer_config(sd)


def test_pact_clipping_levels_get_their_own_decayed_group():
    from n2uq.methods import Quantizers

    model = resnet18(2, False, 10, Quantizers(2, "pact"))
    groups = {g["name"]: g for g in build_optimizer(model, 1e-3, 0.0, pact_alpha_decay=5e-4).param_groups}
    n_clip = sum(1 for n, _ in model.named_parameters() if n.endswith(".clip_alpha"))
    assert len(groups["pact_alpha"]["params"]) == n_clip > 0 and groups["pact_alpha"]["weight_decay"] == 5e-4
    assert len(build_optimizer(resnet18(2, False, 10)).param_groups) == 3  # N2UQ: the reference's three groups


def test_run_sh_names_the_log_like_the_run_folder():
    """run.sh's log file carries the same method tag as the run folder (n2uq.train_state.run_name)."""
    import subprocess

    from n2uq.train_state import run_name
    from tests.conftest import REPO_ROOT

    cases = {(): "n2uq", ("--method", "lsq"): "lsq", ("--method=pact",): "pact",
             ("--maxabs_weights", "--uniform_thresholds"): "n2uq-uniform-thresholds-maxabs-weights",
             ("--full_lr_thresholds",): "n2uq-full-lr-thresholds"}
    for flags, tag in cases.items():
        out = subprocess.run(["bash", "-c", 'source scripts/launch_lib.sh; method_tag "$@"', "_", *flags],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        assert f"resnet18_{out}2bit_quantize_downsample_False" == run_name("resnet18", 2, False, tag)
