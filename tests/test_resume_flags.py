"""A resumed run keeps the recipe its checkpoint records (docs/reliability.md, "Resuming"): a changed
recipe flag is refused in one line naming each flag, a changed run-control flag is not."""

from __future__ import annotations

import re

from n2uq.resume import RUN_CONTROL_FLAGS, recipe_differences, resumed_flags
from n2uq.run_config import TrainConfig
from resnet import train as resnet_train
from tests.conftest import REPO_ROOT
from tests.test_reliability import RUN, fresh_data, one_error_line, run_cli, train_argv


def test_a_changed_recipe_is_refused_and_run_control_flags_may_change(tmp_path, capsys):
    data, save = fresh_data(tmp_path / "data"), tmp_path / "runs"
    code, _, err = run_cli(resnet_train.main, train_argv(data, save), capsys)  # epoch 1 of 2, then stops
    assert code == 0, err
    checkpoint = save / RUN / "checkpoint.pth.tar"
    before = checkpoint.read_bytes()

    code, _, err = run_cli(resnet_train.main, train_argv(data, save, "--learning_rate", "0.001", "--epochs", "3"),
                           capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"error: the run's checkpoint {checkpoint} was trained with another "
                                         f"recipe ("), line
    assert "--epochs 2 vs 3" in line and "--learning_rate 0.00125 vs 0.001" in line, line
    assert "checkpoint vs now" in line and "--resume none" in line, line
    assert checkpoint.read_bytes() == before  # nothing trained, nothing written

    argv = train_argv(data, save, "--log_every", "3", "--save_every_steps", "5")
    argv[argv.index("--epochs_per_run") + 1] = "0"  # run to the end this time
    code, out, err = run_cli(resnet_train.main, argv, capsys)
    assert code == 0, err
    assert "resumed from" in out and "finished 2 epochs" in out, out


def test_recipe_differences_rules():
    flags = TrainConfig().flags()
    assert set(RUN_CONTROL_FLAGS) <= set(flags)  # every name is a flag (a typo would compare nothing)
    assert recipe_differences(None, flags) == [] and recipe_differences({}, flags) == []  # reference format
    changed = {**flags, "momentum": 0.5, "amp": "bf16", "image_size": 32, "workers": 3, "data": "/moved",
               "epochs_per_run": 1, "pretrained": "none", "device": "cpu"}
    assert recipe_differences(flags, changed) == ["--image_size 224 vs 32", "--momentum 0.9 vs 0.5",
                                                  "--amp none vs bf16"]
    assert recipe_differences(flags, {**flags, "pact_alpha_decay": 0.01}) == ["--pact_alpha_decay None vs 0.01"]
    older = {k: v for k, v in flags.items() if k != "label_smooth"}  # written before the flag: its default
    assert recipe_differences(older, flags) == []
    assert recipe_differences(older, {**flags, "label_smooth": 0.0}) == ["--label_smooth 0.1 vs 0.0"]


def test_the_documented_run_control_flags_are_those_of_the_code():
    doc = (REPO_ROOT / "docs" / "reliability.md").read_text()
    section = doc[doc.index("(`n2uq.resume.RUN_CONTROL_FLAGS`)"):doc.index("So\n  the compared flags")]
    named = set(re.findall(r"`--(\w+)`", section))
    assert named == set(RUN_CONTROL_FLAGS), named ^ set(RUN_CONTROL_FLAGS)


def test_a_resume_records_the_initialisation_the_run_started_from():
    now = {"pretrained": "", "epochs": 2}
    assert resumed_flags(now, {"args": {"pretrained": "fp.pth.tar", "epochs": 2}}) == {"pretrained": "fp.pth.tar",
                                                                                      "epochs": 2}
    assert resumed_flags(now, {"args": {}}) == now and resumed_flags(now, {}) == now
