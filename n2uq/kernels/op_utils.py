"""Small helpers shared by the custom operators (dtypes, per-channel vectors, gradient shapes)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from n2uq.quant import GSTESums

__all__ = ["EMPTY", "NUMPY_DTYPES", "compute_dtype", "channel_vector", "grad_like", "ChainSums", "LTQSums",
           "chain_sums_from_buffer", "ltq_sums_from_buffer"]

#: The NumPy type of each dtype the CPU kernels' parameters may have (their per-call work runs in NumPy).
NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

#: Shape of the placeholder a custom op returns for an output it did not compute.
EMPTY = (0,)


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype PyTorch's elementwise ops would compute in (``x`` first, then the parameters)."""
    present = [t for t in tensors if t is not None]
    dtype = torch.result_type(present[0], present[1]) if len(present) > 1 else present[0].dtype
    for t in present[2:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def channel_vector(t: Optional[Tensor], channels: int, dtype: torch.dtype) -> Optional[Tensor]:
    """A per-channel parameter as a contiguous ``[C]`` vector (a shared PReLU weight expanded)."""
    if t is None:
        return None
    return t.detach().reshape(-1).expand(channels).to(dtype).contiguous()


def grad_like(sums, param: Tensor) -> Tensor:
    """Per-channel sums (a tensor or a NumPy array) → the gradient of ``param`` (summed over channels
    for a shared weight), as a tensor of its own (outputs of a custom op may not alias each other)."""
    if not isinstance(sums, Tensor):  # NumPy: convert there (a fresh array), then wrap it
        sums = np.asarray(sums)
        if param.numel() == 1 and sums.size > 1:
            sums = sums.sum()
        return torch.from_numpy(np.array(sums, dtype=NUMPY_DTYPES[param.dtype]).reshape(param.shape))
    if param.numel() == 1 and sums.numel() > 1:
        sums = sums.sum()
    return sums.to(param.dtype, copy=True).reshape(param.shape)


class ChainSums(NamedTuple):
    """Per-channel float64 gradient sums ``[C]`` of the RPReLU chain ``b2 + prelu(x + b1, w)``."""

    bias1: Tensor
    weight: Tensor
    bias2: Tensor


class LTQSums(NamedTuple):
    """What an implementation's ``ltq_backward`` returns besides the input gradient: G-STE's sums
    (float64, :class:`n2uq.quant.GSTESums`) and, with the chain fused in, its per-channel sums.
    Tensors, except from the CPU kernels: NumPy arrays, which :func:`n2uq.quant.gste_param_grads`
    takes as they are (a few µs instead of a dozen small torch ops)."""

    gste: GSTESums
    chain: Optional[ChainSums]


def chain_sums_from_buffer(buffer: Tensor, channels: int) -> ChainSums:
    """Name the float64 ``[grad b2 (C), grad w (C), grad b1 (C)]`` a C or Triton RPReLU backward fills."""
    b2, w, b1 = buffer[: 3 * channels].reshape(3, channels)
    return ChainSums(b1, w, b2)


def ltq_sums_from_buffer(buffer, n: int, channels: Optional[int]) -> LTQSums:
    """Name the float64 buffer (a tensor, or a NumPy array on CPU) a C or Triton LTQ backward fills:
    ``[G (n), Q (n), S1, S2]``, then with the chain its sums as :func:`chain_sums_from_buffer` — the
    one place that reads them by offset."""
    gste = GSTESums(buffer[:n], buffer[n : 2 * n], buffer[2 * n], buffer[2 * n + 1])
    return LTQSums(gste, None if channels is None else chain_sums_from_buffer(buffer[2 * n + 2 :], channels))
