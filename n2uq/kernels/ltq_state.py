"""LTQ's small per-call quantities, computed once per forward and reused by backward.

The formulas are the definitions' (:mod:`n2uq.quant`): ``a⁺``, the thresholds ``T``
(:func:`~n2uq.quant.ltq_forward_thresholds`), the breakpoints ``d``
(:func:`~n2uq.quant.ltq_breakpoints`), G-STE's slopes (:func:`~n2uq.quant.gste_slopes`) and the level
table. Each is a handful of length-``n`` vectors, so the cost is per-call overhead: on CPU the
definitions run on NumPy scalars (the same IEEE additions in the same order, hence bit-identical to
the tensors they give, at a fraction of the cost of one small torch op per addition; an edited formula
that NumPy values do not support gets the tensors instead), on CUDA in one
Triton launch (``triton_ops._state_kernel``, a device transcription checked bit for bit against the
definitions), elsewhere on the tensors themselves. The parameter gradients are computed by
:func:`n2uq.quant.gste_param_grads` from the sums each implementation returns.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from n2uq import quant as definitions  # looked up at each call: an edited formula reaches the fast path
from n2uq.kernels import select
from n2uq.kernels.op_utils import NUMPY_DTYPES

__all__ = ["LTQState", "HostParams", "ltq_state"]


class HostParams(NamedTuple):
    """NumPy views of the parameters the CPU path's state was computed from (``a⁺`` a fresh array),
    kept for the backward's parameter gradients so that they are not converted a second time."""

    a_pos: np.ndarray
    a: np.ndarray
    eps: np.ndarray
    scale2: np.ndarray


class LTQState(NamedTuple):
    """``a_pos`` is in the parameters' dtype; the rest in the compute dtype (that of
    ``x * scale1``), exactly as the elementwise code would promote them."""

    a_pos: Tensor  # [n] max(a, eps)
    thresholds: Tensor  # [n] input thresholds T
    breakpoints: Tensor  # [n+1] interval ends d of the G-STE surrogate
    levels: Tensor  # [n+1] uniform levels L
    table: Tensor  # [n+1] output values L * scale2
    slope: Tensor  # [n] interval / a⁺: the surrogate's slope on each interval
    host: Optional[HostParams] = None  # the CPU path's NumPy parameters (None elsewhere)


def ltq_state(start: Tensor, a: Tensor, scale2: Tensor, eps: Tensor, levels: Tensor, dtype: torch.dtype) -> LTQState:
    """Thresholds, breakpoints, level table and slopes of an LTQ, detached."""
    with torch.no_grad():
        if (start.device.type == "cpu" and a.dtype in NUMPY_DTYPES and start.dtype == a.dtype == eps.dtype
                and select.numpy_state_allowed()):
            try:
                return _state_numpy(start, a, scale2, eps, levels, dtype)
            except (TypeError, AttributeError):  # a formula edited with tensor-only operations: tensors below
                pass
        if start.is_cuda and select.triton_allowed():
            from n2uq.kernels import triton_ops

            if triton_ops.state_supported(a, dtype, start, eps, scale2, levels):
                a_pos, thresholds, breakpoints, slope, table = triton_ops.ltq_state(start, a, eps, scale2, levels)
                return LTQState(a_pos, thresholds, breakpoints, levels, table, slope)
        a_pos = torch.where(a > eps, a, eps)
        levels_c = levels.to(dtype)
        return LTQState(a_pos=a_pos, thresholds=definitions.ltq_forward_thresholds(start, a_pos).to(dtype),
                        breakpoints=definitions.ltq_breakpoints(start, a_pos).to(dtype), levels=levels_c,
                        table=levels_c * scale2.to(dtype), slope=definitions.gste_slopes(a_pos).to(dtype))


def _state_numpy(start: Tensor, a: Tensor, scale2: Tensor, eps: Tensor, levels: Tensor,
                 dtype: torch.dtype) -> LTQState:
    real = NUMPY_DTYPES[a.dtype]
    a_np, eps_np, start_np, scale2_np = (p.detach().numpy() for p in (a, eps, start, scale2))
    eps_v = eps_np[0]
    a_pos = np.where(a_np > eps_v, a_np, eps_v).astype(real, copy=False)
    start_v = start_np.reshape(-1)[0]  # a NumPy scalar: the definitions add scalars
    np_dtype = NUMPY_DTYPES.get(dtype)
    levels_c = levels if levels.dtype == dtype else levels.to(dtype)

    def as_compute(v: np.ndarray) -> Tensor:
        v = np.asarray(v, dtype=real)
        return torch.from_numpy(v.astype(np_dtype, copy=False)) if np_dtype else torch.from_numpy(v).to(dtype)

    if np_dtype is not None:  # L·scale2, the same IEEE products in NumPy
        table = torch.from_numpy(levels_c.numpy() * scale2_np.astype(np_dtype, copy=False))
    else:
        table = levels_c * scale2.detach().to(dtype)
    return LTQState(a_pos=torch.from_numpy(a_pos),
                    thresholds=as_compute(definitions.ltq_forward_thresholds(start_v, a_pos)),
                    breakpoints=as_compute(definitions.ltq_breakpoints(start_v, a_pos)), levels=levels_c,
                    table=table, slope=as_compute(definitions.gste_slopes(a_pos)),
                    host=HostParams(a_pos, a_np, eps_np, scale2_np))
