"""Fast paths for the N2UQ activation path, behind the same autograd interface.

* :mod:`n2uq.kernels.cpu` — C/OpenMP kernels for CPU (built on first use with the system compiler).
* :mod:`n2uq.kernels.triton_ops` — Triton kernels for CUDA (imported only when Triton is present).
* :mod:`n2uq.kernels.fused` — fused block operators: ``RPReLU → LTQ → HardQuantizeConv`` saving the
  stage input once and the conv input as uint8 codes, and the block-output RPReLU with its residual.

Every fast path computes the same forward values, bit for bit, as the plain PyTorch modules, and
the same gradients up to float rounding; the plain PyTorch path is always there as the reference
and the fallback. Choose with ``N2UQ_KERNELS=auto|torch`` or :func:`set_backend` /
:func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "ops_for"]

BACKENDS = ("auto", "torch")
_backend = os.environ.get("N2UQ_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"N2UQ_KERNELS={_backend!r} is not one of {BACKENDS}; unset it or pick one of those")


def get_backend() -> str:
    """``"auto"`` (fast kernels where available) or ``"torch"`` (plain PyTorch everywhere)."""
    return _backend


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {BACKENDS}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend (tests and benchmarks compare the two)."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def ops_for(x: Tensor, dtype: torch.dtype) -> Optional[ModuleType]:
    """The kernel module for ``x`` computed in ``dtype``, or ``None`` for the plain PyTorch path."""
    if _backend == "torch":
        return None
    if x.device.type == "cpu":
        from n2uq.kernels import cpu

        return cpu if cpu.supports(x, dtype) else None
    if x.device.type == "cuda":
        from n2uq.kernels import triton_ops

        return triton_ops if triton_ops.supports(x, dtype) else None
    return None
