"""scripts/run_flags.py: which flags of a training command a saved run does not hold."""

from __future__ import annotations

from scripts.run_flags import differences

RECORDED = {"data": "data/fashion_mnist", "epochs": 8, "learning_rate": 0.002, "quantize_downsample": False,
            "method": "n2uq", "uniform_thresholds": False, "teacher": "none", "workers": 1, "save": "models", "seed": 0}


def test_matching_flags_in_every_spelling_give_nothing():
    flags = ["--epochs", "8", "--learning_rate=2e-3", "--quantize_downsample", "False", "--method", "n2uq",
             "--teacher", "none", "--seed", "0", "-j", "4", "--save", "elsewhere",
             "--data", "./data/../data/fashion_mnist"]
    assert differences(flags, RECORDED) == []  # -j and --save say where and how fast, not what; the same data


def test_a_run_trained_on_other_data_differs():
    assert differences(["--data", "other/folder"], RECORDED) == [
        "--data: other/folder asked, data/fashion_mnist recorded"]


def test_each_differing_flag_is_named():
    flags = ["--epochs", "9", "--learning_rate=1e-3", "--quantize_downsample", "1", "--method", "lsq",
             "--uniform_thresholds", "--label_smooth", "0.2"]
    assert differences(flags, RECORDED) == [
        "--epochs: 9 asked, 8 recorded", "--learning_rate: 1e-3 asked, 0.002 recorded",
        "--quantize_downsample: 1 asked, False recorded", "--method: lsq asked, n2uq recorded",
        "--uniform_thresholds: set asked, False recorded", "--label_smooth: 0.2 asked, not recorded"]
