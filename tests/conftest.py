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


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, split: str) -> None:
    """Fashion-MNIST-style idx files (gzip) for ``split`` (``train`` or ``val``), under the names
    ``scripts/prepare_demo_data.py`` reads."""
    import gzip

    from scripts import prepare_demo_data

    for name, arr in zip(prepare_demo_data.FILES[split], (images, labels)):
        header = (0x0800 | arr.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
        with gzip.open(Path(folder) / f"{name}.gz", "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())


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


# ---------------------------------------------------------------------------------------------
# The fast implementations, each tested against the definitions where this machine has it
# ---------------------------------------------------------------------------------------------

def _fast_backend_params():
    import torch

    from n2uq.kernels import cpu, triton_ops

    cuda = torch.cuda.is_available() and triton_ops.HAS_TRITON
    return [
        pytest.param(("torch", "cpu"), id="torch"),
        pytest.param(("c", "cpu"), id="c", marks=pytest.mark.skipif(
            not cpu.available(), reason=f"the C kernels cannot be built here ({cpu.build_error()})")),
        pytest.param(("triton", "cuda"), id="triton", marks=[pytest.mark.gpu, pytest.mark.skipif(
            not cuda, reason="the Triton kernels need CUDA and Triton")]),
    ]


#: Module that computes the operators under each fast backend (what ``implementation`` must return).
IMPLEMENTATION_OF = {"torch": "n2uq.kernels.torch_ops", "c": "n2uq.kernels.cpu", "triton": "n2uq.kernels.triton_ops"}


class FastBackend:
    """A selected fast backend: ``name`` and the ``device`` its kernels run on."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device

    def __repr__(self) -> str:
        return f"FastBackend({self.name!r}, {self.device!r})"

    def assert_computes(self, x, dtype=None, n_thresholds: int = 3, params=()) -> None:
        """Fail unless this backend's own implementation (not a fallback) computes ``x``."""
        from n2uq.kernels import implementation

        impl = implementation(x, dtype or x.dtype, n_thresholds, params)
        assert impl.__name__ == IMPLEMENTATION_OF[self.name], f"{self.name} would run {impl.__name__}"


@pytest.fixture(params=_fast_backend_params())
def fast_backend(request):
    """Each fast backend in turn (``torch``, ``c``, ``triton``), selected for the test's duration."""
    from n2uq.kernels import use_backend

    name, device = request.param
    with use_backend(name):
        yield FastBackend(name, device)


def save_model_checkpoint(path: Union[str, Path], arch: str = "resnet18", bits: int = 2, method: str = "n2uq",
                          quantize_downsample: bool = False, num_classes: int = 10) -> Path:
    """A checkpoint (``state_dict`` + training ``args`` of a 32×32 run) of a generated model; N2UQ models
    get trained-looking quantizer parameters (:func:`n2uq.export.synthetic.randomize_`)."""
    import torch

    from n2uq.checkpoint import ModelConfig
    from n2uq.export.synthetic import randomize_
    from scripts.model_zoo import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch, bits, quantize_downsample, num_classes, method=method))
    if method == "n2uq":
        randomize_(model, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), seed=2,
                   negative_slope_fraction=0.0)
    torch.save({"epoch": 1, "state_dict": model.state_dict(), "args": {"image_size": 32, "val_resize": 32},
                "config": {"quantizers": {"method": method, "n_bit": bits}}}, path)
    return Path(path)

