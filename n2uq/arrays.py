"""The few array operations LTQ's definitions use on a tensor or a NumPy array alike.

The definitions in :mod:`n2uq.quant` are written with arithmetic only, so that the same lines run
on tensors (the definitions' own forward and backward, the CUDA path) and on NumPy values (the CPU
fast path's per-call state and parameter gradients). The operations arithmetic does not cover are
here, each the same IEEE operations in the same order for both kinds.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["joined", "as_dtype", "suffix_sums", "where_or_zero"]


def joined(values: list):
    """The scalars of a recurrence as one vector: ``torch.cat`` for tensors, a NumPy array otherwise."""
    return torch.cat([v.reshape(1) for v in values]) if isinstance(values[0], Tensor) else np.array(values)


def as_dtype(t, dtype):
    """``t`` detached, in ``dtype``."""
    return t.detach().to(dtype) if isinstance(t, Tensor) else np.asarray(t, dtype=dtype)


def suffix_sums(w):
    """``later[j] = Σ_{k > j} w[k]``, summed from the last entry down; ``later[-1] = 0``."""
    if isinstance(w, Tensor):
        return torch.cat([w[1:].flip(0).cumsum(0).flip(0), w.new_zeros(1)])
    return np.concatenate([np.cumsum(w[:0:-1])[::-1], np.zeros(1, w.dtype)])


def where_or_zero(keep, values):
    """``values`` where ``keep``, else 0."""
    if isinstance(values, Tensor):
        return torch.where(keep, values, torch.zeros_like(values))
    return np.where(keep, values, np.zeros_like(values))
