"""Which implementation computes the N2UQ operators: the one place where this is decided.

``N2UQ_KERNELS`` (read on first use) or :func:`set_backend` / :func:`use_backend`:

============  ==============================================================================
``auto``      the fastest available: the C kernels for CPU float32/float64, Triton for CUDA
              (at most 15 thresholds, i.e. up to 4 bits), the plain-PyTorch operators elsewhere
``torch``     the fused operators computed with plain PyTorch everywhere
``c``         like ``auto`` on CPU, but an error if the C kernels cannot be built
``triton``    like ``auto`` on CUDA, but an error if Triton is not installed
``reference`` no fused operator at all: every block, and ``n2uq.LTQ`` & co., runs module by
              module through the definitions in :mod:`n2uq.quant` (edit those and the
              models follow). Not the authors' code: the name of this switch only
============  ==============================================================================

Every implementation computes the same forward values, bit for bit, and the same gradients up to
float rounding; ``tests/test_backends.py`` checks each available one against the definitions.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["BACKENDS", "KernelUnavailableError", "get_backend", "set_backend", "use_backend", "fused",
           "implementation", "numpy_state_allowed", "triton_allowed"]

BACKENDS = ("auto", "torch", "c", "triton", "reference")


class KernelUnavailableError(RuntimeError):
    """An explicitly requested kernel backend cannot run on this machine."""


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"N2UQ_KERNELS / kernel backend {name!r} is not one of {', '.join(BACKENDS)}; "
                         f"unset N2UQ_KERNELS or pick one of those")
    return name


_backend: Optional[str] = None  # read from N2UQ_KERNELS on first use, so a bad value is a clear error


def get_backend() -> str:
    """The selected backend name (one of :data:`BACKENDS`)."""
    global _backend
    if _backend is None:
        _backend = _check(os.environ.get("N2UQ_KERNELS", "auto"))
    return _backend


def set_backend(name: str) -> None:
    """Select a backend for the whole process (see the module docstring)."""
    global _backend
    _backend = _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend for the duration of a ``with`` block (tests and benchmarks compare them)."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def fused() -> bool:
    """Whether blocks run the fused operators (every backend but ``reference``)."""
    return get_backend() != "reference"


def _cpu_kernels() -> ModuleType | None:
    from n2uq.kernels import cpu

    if cpu.available():
        return cpu
    if get_backend() == "c":
        raise KernelUnavailableError(f"N2UQ_KERNELS=c but the C kernels cannot be built ({cpu.build_error()}); "
                                     f"install a C compiler (gcc) or use N2UQ_KERNELS=auto or torch")
    return None


def _triton_kernels() -> ModuleType | None:
    from n2uq.kernels import triton_ops

    if triton_ops.HAS_TRITON:
        return triton_ops
    if get_backend() == "triton":
        raise KernelUnavailableError("N2UQ_KERNELS=triton but Triton is not installed; `pip install triton` "
                                     "or use N2UQ_KERNELS=auto or torch")
    return None


def implementation(x: Tensor, dtype: torch.dtype, n_thresholds: int = 0,
                   params: Sequence[Tensor] = ()) -> ModuleType:
    """The module that computes an operator on ``x`` in ``dtype``: ``cpu``, ``triton_ops`` or ``torch_ops``.

    ``n_thresholds``: the LTQ's thresholds (Triton takes at most 15); ``params``: per-channel
    parameters, which the kernels read in ``dtype`` only (mixed dtypes take plain PyTorch).
    """
    from n2uq.kernels import torch_ops

    backend = get_backend()
    if backend in ("torch", "reference") or any(p.dtype != dtype for p in params):
        return torch_ops
    if x.device.type == "cpu" and backend in ("auto", "c"):
        cpu = _cpu_kernels()
        if cpu is not None and cpu.supports(x, dtype):
            return cpu
    elif x.is_cuda and backend in ("auto", "triton"):
        triton_ops = _triton_kernels()
        if triton_ops is not None and triton_ops.supports(x, dtype) and n_thresholds <= triton_ops.MAX_THRESHOLDS:
            return triton_ops
    return torch_ops


def numpy_state_allowed() -> bool:
    """Whether LTQ's small per-call state may be computed with NumPy on CPU (part of the CPU fast path)."""
    return get_backend() in ("auto", "c")


def triton_allowed() -> bool:
    """Whether LTQ's small per-call state may be computed with one Triton launch on CUDA."""
    return get_backend() in ("auto", "triton") and _triton_kernels() is not None
