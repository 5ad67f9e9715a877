"""The authors' file fetched with gdown replaces its target only when it is a readable checkpoint
(Google Drive answers a quota or sign-in problem with an HTML page); no network is used here."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from n2uq.pretrained import PretrainedError, fetch_authors_file

QUOTA_PAGE = b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body></body></html>"


def fake_gdown(monkeypatch, write):
    """``gdown.download`` writes what ``write(path)`` puts there; the calls are counted."""
    calls = []

    def download(id, output, quiet):  # noqa: A002 - gdown's own keyword
        calls.append(id)
        write(output)
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=download))
    return calls


@pytest.mark.parametrize("body, said", [
    (QUOTA_PAGE, "web page, not the file"),
    (b"\x00\x01 not a checkpoint" * 10, "is not a readable checkpoint"),
], ids=["html-page", "other-bytes"])
def test_a_download_that_is_no_checkpoint_is_deleted_and_said(tmp_path, monkeypatch, body, said):
    models = tmp_path / "models"
    calls = fake_gdown(monkeypatch, lambda path: open(path, "wb").write(body))
    with pytest.raises(PretrainedError) as exc:
        fetch_authors_file("resnet18", True, str(models))
    msg = str(exc.value)
    assert calls and said in msg and f"{len(body)}-byte" in msg, msg
    assert "by hand" in msg and "models/README.md" in msg and "\n" not in msg, msg
    assert sorted(p.name for p in models.iterdir()) == []  # neither the .part nor the target


def test_a_downloaded_checkpoint_replaces_the_target(tmp_path, monkeypatch):
    models = tmp_path / "models"
    weights = {"state_dict": {"conv1.weight": torch.ones(2, 3, 1, 1)}}
    calls = fake_gdown(monkeypatch, lambda path: torch.save(weights, path))
    path = fetch_authors_file("resnet18", True, str(models))
    assert calls and path == str(models / "real_res18.pth.tar")
    assert sorted(p.name for p in models.iterdir()) == ["real_res18.pth.tar"]
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["conv1.weight"], torch.ones(2, 3, 1, 1))


def test_a_failed_download_leaves_no_part_file(tmp_path, monkeypatch):
    models = tmp_path / "models"

    def half_then_fail(path):
        open(path, "wb").write(b"PK\x03\x04 half")
        raise ConnectionError("connection reset by peer")

    fake_gdown(monkeypatch, half_then_fail)
    with pytest.raises(PretrainedError, match="connection reset by peer"):
        fetch_authors_file("resnet18", True, str(models))
    assert list(models.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--models_dir", "FILE"], "error: --models_dir FILE is a file, not a folder; pass a folder"),
    (["--arch", "mobilenetv2", "--quantize_downsample", "1"], "error: no released mobilenetv2 file has "
     "quantize_downsample=True (mobilenetv2 has no downsample choice); drop --quantize_downsample"),
])
def test_download_refuses_bad_arguments_before_downloading(tmp_path, monkeypatch, capsys, argv, message):
    from n2uq.cli import run_main
    from scripts import download_pretrained

    calls = fake_gdown(monkeypatch, lambda path: None)
    (tmp_path / "FILE").write_text("a file")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_main(download_pretrained.main, argv)
    assert exc.value.code == 2 and capsys.readouterr().err == message + "\n" and calls == []


def test_download_help_shows_each_default_once(capsys):
    from scripts import download_pretrained

    with pytest.raises(SystemExit):
        download_pretrained.main(["--help"])
    assert "(default: None)" not in capsys.readouterr().out
