"""ImageFolder data, the paper's transforms (SPEC §6) and deterministic distributed samplers.

Training order and augmentation are functions of ``(seed, epoch)`` only: :class:`TrainSampler`
draws the permutation from a generator seeded with ``seed + epoch`` (as ``DistributedSampler``)
and hands each sample its own augmentation seed, which :class:`SeededDataset` applies before the
random transforms. So a run resumed at any epoch (or at any step, with ``start_batch``) sees
exactly the images and crops an uninterrupted run sees, whatever the number of loader workers.
Validation shards the images over ranks without padding, so every image is counted once.
"""

from __future__ import annotations

import math
import os
from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms

__all__ = ["DataError", "IMAGENET_MEAN", "IMAGENET_STD", "train_transform", "val_transform",
           "check_data_dir", "image_folder", "SeededDataset", "TrainSampler", "ShardSampler",
           "build_train_loader", "build_val_loader"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """The data directory is missing or not in the ``train/`` + ``val/`` ImageFolder layout."""


def train_transform(image_size: int = 224, min_crop_scale: float = 0.08) -> transforms.Compose:
    """RandomResizedCrop(size, scale=(0.08, 1)), horizontal flip, ToTensor, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def val_transform(image_size: int = 224, val_resize: int = 256) -> transforms.Compose:
    """Resize(256), CenterCrop(224), ToTensor, ImageNet normalisation (SPEC §6)."""
    return transforms.Compose([
        transforms.Resize(val_resize),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def check_data_dir(root: str) -> None:
    """Raise :class:`DataError` unless ``root`` holds ``train/`` and ``val/`` class folders."""
    if not os.path.exists(root):
        raise DataError(f"data directory not found: {root} (expected an ImageFolder tree with train/ and "
                        f"val/ inside; for a demo run scripts/prepare_demo_data.py)")
    if not os.path.isdir(root):
        raise DataError(f"data path is not a directory: {root}")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{root} has no {split}/ folder (expected {root}/train/<class>/*.jpg and "
                            f"{root}/val/<class>/*.jpg)")


def image_folder(root: str, split: str, transform) -> datasets.ImageFolder:
    """``ImageFolder(root/split)``; an empty tree or an empty class folder is a one-line :class:`DataError`."""
    path = os.path.join(root, split)
    try:
        ds = datasets.ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    return ds


class SeededDataset(Dataset):
    """Wraps a map-style dataset; ``ds[(index, seed)]`` applies its random transforms under ``seed``.

    The global torch RNG of the calling process is left untouched (``fork_rng``).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 2_654_435_761) % (2**63 - 1)


class TrainSampler(Sampler):
    """Shuffled, rank-sharded ``(index, augmentation seed)`` pairs, deterministic per (seed, epoch).

    Like ``DistributedSampler(shuffle=True, drop_last=False)``: the permutation is padded by
    repetition to a multiple of ``world_size`` and rank ``r`` takes ``perm[r::world_size]``.
    Call :meth:`set_epoch` before each epoch. ``start_batch`` skips that many batches of
    ``batch_size`` (per rank) once, for resuming inside an epoch.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch = 0
        self.num_samples = math.ceil(size / world_size)
        self.skip = 0

    def set_epoch(self, epoch: int, start_batch: int = 0, batch_size: int = 0) -> None:
        self.epoch = epoch
        self.skip = start_batch * batch_size

    def indices(self) -> List[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.size, generator=g).tolist()
        total = self.num_samples * self.world_size
        perm += (perm * math.ceil(total / max(len(perm), 1)))[: total - len(perm)]
        return perm[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for i in self.indices()[self.skip:]:
            yield i, _sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler):
    """Indices ``rank, rank + world_size, ...``: each sample on exactly one rank, no padding."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices: Sequence[int] = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _loader_kwargs(workers: int, pin_memory: bool) -> dict:
    kwargs = {"num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        kwargs["persistent_workers"] = True
    return kwargs


def build_train_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                       workers: int, pin_memory: bool = False) -> DataLoader:
    """Loader over :class:`SeededDataset` with a :class:`TrainSampler`; ``batch_size`` per rank.

    Drops the last incomplete batch (a batch of one breaks BatchNorm in training mode).
    """
    sampler = TrainSampler(len(dataset), rank, world_size, seed)  # type: ignore[arg-type]
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, drop_last=True,
                      **_loader_kwargs(workers, pin_memory))


def build_val_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, workers: int,
                     pin_memory: bool = False) -> DataLoader:
    """Loader over this rank's shard of ``dataset`` (:class:`ShardSampler`); ``batch_size`` per rank."""
    sampler = ShardSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      **_loader_kwargs(workers, pin_memory))
