"""ImageFolder data, the paper's transforms (docs/SPEC.md, training recipe) and deterministic distributed samplers.

Training order and augmentation are functions of ``(seed, epoch)`` only: :class:`TrainSampler`
draws the permutation from a generator seeded with ``seed + epoch`` (as ``DistributedSampler``)
and hands each sample its own augmentation seed, which :class:`SeededDataset` applies before the
random transforms. So a run resumed at any epoch (or at any step, with ``start_batch``) sees
exactly the images and crops an uninterrupted run sees, whatever the number of loader workers.
Validation shards the images over ranks without padding, so every image is counted once.

Unreadable images (corrupt, truncated, not an image) never raise inside a loader worker:
:class:`CheckedImageFolder` returns a :class:`BadSample` marker naming the file, and
:func:`collate_checked` drops markers from the batch and hands them over beside it, so the training
loop decides (stop with the path, or skip and count) on every rank alike.

:class:`DataError` and :func:`check_data_dir` live in :mod:`n2uq.run_config` (the command line checks
the data folder before torchvision is imported) and are re-exported here.
"""

from __future__ import annotations

import math
import os
import re
import signal
import threading
from typing import Any, Iterator, List, NamedTuple, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import datasets, transforms

from n2uq.run_config import DataError, check_data_dir

__all__ = ["DataError", "BadImageError", "BadSample", "IMAGENET_MEAN", "IMAGENET_STD", "train_transform",
           "val_transform", "check_data_dir", "CheckedImageFolder", "image_folder", "collate_checked",
           "split_batch", "SeededDataset", "TrainSampler", "ShardSampler", "build_train_loader",
           "build_val_loader"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadImageError(RuntimeError):
    """An image file could not be read or decoded; the message names the file."""


class BadSample(NamedTuple):
    """Marker a :class:`CheckedImageFolder` returns in place of an unreadable image."""

    path: str
    reason: str

    def describe(self) -> str:
        return f"unreadable image {self.path} ({self.reason})"


def train_transform(image_size: int = 224, min_crop_scale: float = 0.08) -> transforms.Compose:
    """RandomResizedCrop(size, scale=(0.08, 1)), horizontal flip, ToTensor, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def val_transform(image_size: int = 224, val_resize: int = 256) -> transforms.Compose:
    """Resize(256), CenterCrop(224), ToTensor, ImageNet normalisation (docs/SPEC.md, training recipe)."""
    return transforms.Compose([
        transforms.Resize(val_resize),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class CheckedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` that turns an unreadable image into a :class:`BadSample` (``mark_bad``) or a
    one-line :class:`BadImageError` naming the file (the default, for direct indexing)."""

    mark_bad = False

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
            if self.transform is not None:
                sample = self.transform(sample)
        except Exception as exc:  # PIL raises many kinds: UnidentifiedImageError, OSError, SyntaxError, ...
            first = (str(exc).strip().splitlines() or [""])[0]
            first = re.sub(r"\s*<_io\.\w+ name=[^>]*>|\s*'" + re.escape(path) + "'", "", first).strip(" :")
            bad = BadSample(path, f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
            if self.mark_bad:
                return bad
            raise BadImageError(f"{bad.describe()}; replace or remove the file") from None
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def image_folder(root: str, split: str, transform) -> CheckedImageFolder:
    """``ImageFolder(root/split)``; an empty tree or an empty class folder is a one-line :class:`DataError`."""
    path = os.path.join(root, split)
    try:
        ds = CheckedImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    return ds


def collate_checked(batch: Sequence[Any]) -> Tuple[torch.Tensor, torch.Tensor, List[BadSample]]:
    """``(images, targets, bad)``: the readable samples collated, the :class:`BadSample` markers apart.

    A batch without a readable image gives empty ``images``/``targets`` tensors.
    """
    good = [s for s in batch if not isinstance(s, BadSample)]
    bad = [s for s in batch if isinstance(s, BadSample)]
    if good:
        images, targets = default_collate(good)
    else:
        images, targets = torch.empty(0), torch.empty(0, dtype=torch.long)
    return images, targets, bad


def split_batch(batch: Sequence[Any]) -> Tuple[torch.Tensor, torch.Tensor, List[BadSample]]:
    """``(images, targets, bad)`` from a :func:`collate_checked` batch or a plain ``(images, targets)`` one."""
    if len(batch) == 3:
        return batch[0], batch[1], [BadSample(*b) for b in batch[2]]
    return batch[0], batch[1], []


def _mark_bad(dataset: Dataset) -> None:
    inner = getattr(dataset, "dataset", dataset)
    if isinstance(inner, CheckedImageFolder):
        inner.mark_bad = True


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


def _worker_signals(worker_id: int) -> None:
    """Loader workers leave stop signals to the main process, which saves and stops cleanly.

    Ctrl-C and schedulers signal every process of a job; a worker that died of it would make the
    main process fail instead of saving. So workers ignore SIGINT, and obey SIGTERM only when the
    main process sends it (``DataLoader`` shutdown and interpreter exit terminate workers that
    way): SIGTERM is blocked and a thread reads the sender of each one. Workers still exit on
    their own when the main process goes away. The block must hold in every thread of the worker,
    PyTorch's own included, which start before this function runs: :class:`SignalSafeLoader`
    starts the workers with SIGTERM blocked, so all their threads inherit it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS / Windows: keep the default
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_parent() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(128 + signal.SIGTERM)  # what SIGTERM's default action amounts to

    threading.Thread(target=wait_for_parent, name="sigterm-from-parent", daemon=True).start()


class SignalSafeLoader(DataLoader):
    """A ``DataLoader`` whose workers start with SIGTERM blocked in the thread that forks them, so that
    every thread of a worker (each inherits its creator's mask) leaves SIGTERM to
    :func:`_worker_signals`; the main process's own mask is restored at once."""

    def _get_iterator(self):
        if self.num_workers == 0 or not hasattr(signal, "sigwaitinfo"):
            return super()._get_iterator()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _loader_kwargs(workers: int, pin_memory: bool) -> dict:
    kwargs = {"num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        kwargs.update(persistent_workers=True, worker_init_fn=_worker_signals)
    return kwargs


def build_train_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                       workers: int, pin_memory: bool = False) -> DataLoader:
    """Loader over :class:`SeededDataset` with a :class:`TrainSampler`; ``batch_size`` per rank.

    Drops the last incomplete batch (a batch of one breaks BatchNorm in training mode). Batches
    are :func:`collate_checked` triples; unreadable images come back as markers, not exceptions.
    """
    sampler = TrainSampler(len(dataset), rank, world_size, seed)  # type: ignore[arg-type]
    _mark_bad(dataset)
    return SignalSafeLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, drop_last=True,
                      collate_fn=collate_checked, **_loader_kwargs(workers, pin_memory))


def build_val_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, workers: int,
                     pin_memory: bool = False) -> DataLoader:
    """Loader over this rank's shard of ``dataset`` (:class:`ShardSampler`); ``batch_size`` per rank."""
    sampler = ShardSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    _mark_bad(dataset)
    return SignalSafeLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      collate_fn=collate_checked, **_loader_kwargs(workers, pin_memory))
