"""Samplers and seeded augmentation: deterministic per (seed, epoch), complete, no padded duplicates."""

from __future__ import annotations

import torch

from n2uq import data as D


def test_train_sampler_is_deterministic_and_shards_cover_everything():
    full = D.TrainSampler(11, 0, 1, seed=5)
    full.set_epoch(3)
    order = [i for i, _ in full]
    again = D.TrainSampler(11, 0, 1, seed=5)
    again.set_epoch(3)
    assert order == [i for i, _ in again] and sorted(order) == list(range(11))
    other = D.TrainSampler(11, 0, 1, seed=5)
    other.set_epoch(4)
    assert [i for i, _ in other] != order
    shards = []
    for rank in range(3):
        s = D.TrainSampler(11, rank, 3, seed=5)
        s.set_epoch(3)
        shards.append([i for i, _ in s])
    assert all(len(s) == 4 for s in shards)  # padded to 12 for training
    assert set().union(*map(set, shards)) == set(range(11))


def test_train_sampler_skips_batches_for_mid_epoch_resume():
    s = D.TrainSampler(20, 0, 1, seed=0)
    s.set_epoch(2)
    whole = list(s)
    s.set_epoch(2, start_batch=3, batch_size=4)
    assert list(s) == whole[12:] and len(s) == 8


def test_shard_sampler_counts_every_image_once():
    shards = [list(D.ShardSampler(7, r, 2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))
    assert len(shards[0]) == 4 and len(shards[1]) == 3


def test_seeded_dataset_repeats_crops_and_keeps_global_rng(tiny_imagefolder):
    ds = D.SeededDataset(D.image_folder(str(tiny_imagefolder), "train", D.train_transform(8)))
    state = torch.get_rng_state()
    a, _ = ds[(2, 123)]
    b, _ = ds[(2, 123)]
    c, _ = ds[(2, 124)]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_data_dir_errors(tmp_path, tiny_imagefolder):
    import pytest

    with pytest.raises(D.DataError, match="not found"):
        D.check_data_dir(str(tmp_path / "missing"))
    with pytest.raises(D.DataError, match="no train/ folder"):
        D.check_data_dir(str(tmp_path))
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    (tmp_path / "train" / "cls").mkdir()
    (tmp_path / "train" / "cls" / "x.png").write_bytes(b"")
    with pytest.raises(D.DataError, match="empty_class"):
        D.image_folder(str(tmp_path), "train", None)
