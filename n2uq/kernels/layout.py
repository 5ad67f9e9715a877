"""Memory-layout helpers shared by the implementations: work on a dense tensor in any dimension
order (channels_last included) without copying it, and give results the input's layout."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["memory_order", "as_layout_of"]


def memory_order(t: Tensor) -> Optional[tuple[list[int], list[int]]]:
    """``(perm, inverse)`` such that ``t.permute(perm)`` is a contiguous view of ``t``.

    ``None`` when ``t`` is contiguous already or not dense in any dimension order (e.g. a strided
    slice). For a channels_last tensor ``perm`` is ``[0, 2, 3, 1]``: elementwise work done on the
    permuted view and permuted back by ``inverse`` keeps the input's layout without a copy.
    """
    if t.is_contiguous():
        return None
    perm = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    if not t.permute(perm).is_contiguous():
        return None
    inverse = [0] * t.dim()
    for i, d in enumerate(perm):
        inverse[d] = i
    return perm, inverse


def as_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with the strides ``torch.empty_like(like)`` would have (a copy only if they differ).

    The custom operators promise outputs in that layout (their fake implementations say so), so
    every implementation's result passes through here.
    """
    if t.stride() == like.stride():  # the usual case: same shape, same dense layout
        return t
    ref = torch.empty_like(like, dtype=t.dtype)
    return t if t.stride() == ref.stride() else ref.copy_(t)
