"""Small helpers shared by the custom operators (dtypes, per-channel vectors, gradient shapes)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["EMPTY", "compute_dtype", "channel_vector", "grad_like"]

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


def grad_like(sums: Tensor, param: Tensor) -> Tensor:
    """Per-channel sums → the gradient of ``param`` (summed over channels for a shared weight), as a
    tensor of its own (outputs of a custom op may not alias each other)."""
    if param.numel() == 1 and sums.numel() > 1:
        sums = sums.sum()
    return sums.to(param.dtype, copy=True).reshape(param.shape)
