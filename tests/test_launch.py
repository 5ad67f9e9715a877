"""run.sh's log file is named after the run folder train.py itself names, whatever the flags."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# Checks the flags with the real resnet/train.py --check_only; "trains" by printing its flags.
STUB = f"""import runpy, sys
if "--check_only" in sys.argv:
    sys.argv[0] = {str(REPO_ROOT / "resnet" / "train.py")!r}
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    print("trained", *sys.argv[1:])
"""


@pytest.mark.parametrize("flags, log", [
    (["--full_lr_thresholds"], "resnet18_n2uq-full-lr-thresholds_2bit_quantize_downsample_False"),
    (["--full_precision"], "resnet18_fp"),
    (["--method", "lsq", "--n_bit", "3"], "resnet18_lsq_3bit_quantize_downsample_False"),
])
def test_the_log_is_named_after_the_run_folder(tiny_imagefolder, tmp_path, flags, log):
    stub = tmp_path / "train.py"
    stub.write_text(STUB)
    script = 'source "$1/scripts/launch_lib.sh"; die() { echo "error: $*" >&2; exit 2; }; shift; launch_training "$@"'
    argv = [str(stub), "--data", str(tiny_imagefolder), "--n_bit", "2", "--quantize_downsample", "False",
            "--pretrained", "none", "--teacher", "none", "--save", str(tmp_path / "models"), *flags]
    env = dict(os.environ, PYTHON=sys.executable, NPROC="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(["bash", "-c", script, "_", str(REPO_ROOT), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoints: {tmp_path / 'models' / log} (--save is writable)" in proc.stdout
    assert [p.name for p in (tmp_path / "log").iterdir()] == [f"{log}.txt"]
    assert "trained" in (tmp_path / "log" / f"{log}.txt").read_text()


@pytest.mark.parametrize("flags, said", [
    (["--n_bit", "3"], "--n_bit 3"), (["--n_bit=3"], "--n_bit 3"), (["--student", "resnet34"], "--student resnet34"),
    (["--quantize_downsample", "1"], "--quantize_downsample 1"),
    (["--quantize_downsample=true"], "--quantize_downsample true"),
])
def test_run_sh_refuses_flags_that_contradict_its_arguments(tmp_path, flags, said):
    proc = subprocess.run(["bash", str(REPO_ROOT / "resnet" / "run.sh"), "resnet18", "2", "0", *flags],
                          cwd=tmp_path, env=dict(os.environ, DATA=str(tmp_path)), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "log").exists()
    assert proc.stderr == f"run.sh: error: {said} contradicts the ARCH BITS QD arguments (resnet18 2 False); set it " \
                          "there\n"


def test_run_sh_takes_flags_that_agree_with_its_arguments(tiny_imagefolder, tmp_path):
    flags = ["--n_bit", "2", "--quantize_downsample=False", "--student", "resnet18", "--pretrained", "none",
             "--teacher", "none", "--save", str(tmp_path / "models"), "--check_only"]  # checked, nothing trained
    env = dict(os.environ, DATA=str(tiny_imagefolder), PYTHON=sys.executable, NPROC="1")
    proc = subprocess.run(["bash", str(REPO_ROOT / "resnet" / "run.sh"), "resnet18", "2", "0", *flags], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "log" / "resnet18_2bit_quantize_downsample_False.txt").is_file()
