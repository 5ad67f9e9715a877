"""Build a small ImageFolder demo set (``train/``, ``val/``, RGB PNG, 10 classes) from Fashion-MNIST.

    python scripts/prepare_demo_data.py --out data/fashion_mnist
    python scripts/prepare_demo_data.py --out data/tiny --train_per_class 50 --val_per_class 10 --size 32

Source: the Debian package's idx files (``apt-get install -y dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist/``), or torchvision's download when ``--source`` has no idx
files and the machine is online. ``train/`` takes the first N images of each class from the
Fashion-MNIST training set, ``val/`` the first M of each class from its test set. Images are
resized from 28x28 to ``--size`` (bilinear) and stored as 3-channel PNG.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()

import numpy as np  # noqa: E402

from n2uq.cli import OneLineParser, UsageError, check_output_dir, run_main  # noqa: E402

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle_boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_file(path: str) -> Optional[str]:
    """The existing ``path.gz`` or ``path``, else ``None``."""
    return next((c for c in (path + ".gz", path) if os.path.isfile(c)), None)


def _open(path: str):
    found = _idx_file(path)
    if found is None:
        return None
    return gzip.open(found, "rb") if found.endswith(".gz") else open(found, "rb")


def read_idx(path: str) -> np.ndarray:
    """An idx file (``.gz`` or plain) as a uint8 array: images [N, 28, 28] or labels [N].

    A missing, truncated or damaged file is a one-line :class:`UsageError` naming it."""
    f = _open(path)
    if f is None:
        raise UsageError(f"{path}(.gz) not found: the four Fashion-MNIST idx files must be in one folder")
    try:
        with f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise UsageError(f"{path}: unreadable ({exc}); fetch the file again") from None
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise UsageError(f"{path}: not an idx uint8 file (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UsageError(f"{path}: truncated ({data.size} of {int(np.prod(dims))} values); fetch the file again")
    return data.reshape(dims)


def load_split(source: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    names = FILES[split]
    images, labels = (read_idx(os.path.join(source, name)) for name in names)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UsageError(f"{source}: {names[0]} ({images.shape}) and {names[1]} ({labels.shape}) do not "
                         f"pair up as images and labels")
    return images, labels


def download_with_torchvision(cache: str) -> str:
    """Fetch Fashion-MNIST with torchvision into ``cache``; returns the folder with the idx files."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(cache, train=train, download=True)
    return os.path.join(cache, "FashionMNIST", "raw")


def first_per_class(labels: np.ndarray, per_class: int, split: str) -> List[int]:
    chosen: List[int] = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise UsageError(f"{split}: class {CLASSES[c]} has only {len(idx)} images, asked for {per_class}")
        chosen.extend(idx.tolist())
    return chosen


def write_split(images: np.ndarray, labels: np.ndarray, indices: List[int], out_dir: str, size: int) -> None:
    from PIL import Image

    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(out_dir, f"{c}_{name}"), exist_ok=True)
    for i in indices:
        img = Image.fromarray(images[i])
        if size != img.width:
            img = img.resize((size, size), Image.BILINEAR)
        c = int(labels[i])
        img.convert("RGB").save(os.path.join(out_dir, f"{c}_{CLASSES[c]}", f"{i:05d}.png"))


def main(argv: Optional[List[str]] = None) -> int:
    p = OneLineParser(prog="prepare_demo_data.py", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="data/fashion_mnist", help="output folder (gets train/ and val/)")
    p.add_argument("--source", default=DEFAULT_SOURCE, help="folder with the Fashion-MNIST idx(.gz) files")
    p.add_argument("--train_per_class", type=int, default=1000, help="training images per class (max 6000)")
    p.add_argument("--val_per_class", type=int, default=200, help="validation images per class (max 1000)")
    p.add_argument("--size", type=int, default=32, help="side of the stored square images, in pixels")
    p.add_argument("--download_dir", default="data/.fashion_mnist_download",
                   help="where torchvision downloads when --source has no idx files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = p.parse_args(argv)
    if not 1 <= args.train_per_class <= 6000 or not 1 <= args.val_per_class <= 1000:
        raise UsageError("--train_per_class must be in 1..6000 and --val_per_class in 1..1000")
    if not 8 <= args.size <= 512:
        raise UsageError(f"--size must be in 8..512 pixels, got {args.size}")
    check_output_dir(args.out, "--out")
    if args.source != DEFAULT_SOURCE and not os.path.isdir(args.source):
        raise UsageError(f"--source folder not found: {args.source} (it must hold the Fashion-MNIST idx files; "
                         f"leave --source out to use {DEFAULT_SOURCE} or a download)")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} already exists and is not empty; pass --overwrite or another --out")

    source = args.source
    if _idx_file(os.path.join(source, FILES["train"][0])) is None:
        try:
            source = download_with_torchvision(args.download_dir)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"no Fashion-MNIST idx files in {args.source} and the download failed ({reason}); "
                             f"install them with: apt-get install -y dataset-fashion-mnist") from None
    # Both splits are read and checked before an existing --out is touched.
    chosen = {}
    for split, per_class in (("train", args.train_per_class), ("val", args.val_per_class)):
        images, labels = load_split(source, split)
        chosen[split] = images, labels, first_per_class(labels, per_class, split)
    if args.overwrite and os.path.isdir(args.out):
        import shutil

        for split in ("train", "val"):
            shutil.rmtree(os.path.join(args.out, split), ignore_errors=True)
    for split, per_class in (("train", args.train_per_class), ("val", args.val_per_class)):
        images, labels, indices = chosen[split]
        write_split(images, labels, indices, os.path.join(args.out, split), args.size)
        print(f"{split}: {len(indices)} images ({per_class} per class, {args.size}x{args.size} RGB PNG) "
              f"in {os.path.join(args.out, split)}")
    return 0


if __name__ == "__main__":
    run_main(main)
