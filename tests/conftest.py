"""Shared fixtures: tiny generated ImageFolder trees (``train/`` + ``val/``) in temporary folders.

Each class is a colour with a few noisy variations, so a model can learn it in a few steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence, Union

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads made
# CPU steps up to 10x slower. Read by libgomp when torch is first imported, hence before it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
_PALETTE = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 210), (40, 200, 210)]


def make_image_folder(root: Union[str, Path], classes: int = 3, train_per_class: Union[int, Sequence[int]] = 4,
                      val_per_class: Union[int, Sequence[int]] = 3, size: int = 16, seed: int = 0) -> Path:
    """Write ``root/{train,val}/class_<k>/<i>.png`` (RGB, ``size``×``size``) and return ``root``.

    ``*_per_class`` may be a list (one count per class), e.g. to get an odd validation size.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        counts = [per_class] * classes if isinstance(per_class, int) else list(per_class)
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array(_PALETTE[k % len(_PALETTE)], dtype=np.float32)
            for i in range(counts[k]):
                img = base + rng.normal(0, 25, size=(size, size, 3))
                img[: size // 2, : size // 2] *= 0.5 + 0.5 * (k % 2)  # a class-dependent pattern too
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """3 classes, 4 training images each (12), 3 + 2 + 2 = 7 validation images (odd), 16×16."""
    return make_image_folder(tmp_path_factory.mktemp("tiny_data"), classes=3, train_per_class=4,
                             val_per_class=[3, 2, 2], size=16)


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for running the repository's scripts in a subprocess (repo root importable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHON"] = sys.executable
    return env
