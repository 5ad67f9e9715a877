"""LTQ's small per-call quantities, computed once per forward and reused by backward.

From the parameters: ``a⁺``, the thresholds ``T``, the breakpoints ``d``, the level table and the
G-STE slopes (:func:`ltq_state`); after the backward pass: the parameter gradients from the
per-interval sums (:func:`ltq_param_grads`). Each is a handful of length-``n`` vectors, so the
cost is per-call overhead: on CPU they run on NumPy scalars (the same IEEE additions in the same
order, hence bit-identical to :func:`n2uq.quant.ltq_forward_thresholds`), on CUDA in one Triton
launch each, elsewhere through the definitions in plain PyTorch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from n2uq.kernels import select
from n2uq.quant import ltq_breakpoints, ltq_forward_thresholds

__all__ = ["LTQState", "ltq_state", "ltq_param_grads"]

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class LTQState(NamedTuple):
    """``a_pos``/``slope`` are in the parameters' dtype; the rest in the compute dtype (that of
    ``x * scale1``), exactly as the elementwise code would promote them."""

    a_pos: Tensor  # [n] max(a, eps)
    thresholds: Tensor  # [n] input thresholds T
    breakpoints: Tensor  # [n+1] interval ends d of the G-STE surrogate
    levels: Tensor  # [n+1] uniform levels L
    table: Tensor  # [n+1] output values L * scale2
    slope: Tensor  # [n] interval / a⁺: the surrogate's slope on each interval


def ltq_state(start: Tensor, a: Tensor, scale2: Tensor, eps: Tensor, levels: Tensor, dtype: torch.dtype) -> LTQState:
    """Thresholds, breakpoints, level table and slopes of an LTQ, detached."""
    with torch.no_grad():
        if (start.device.type == "cpu" and a.dtype in _NUMPY_DTYPES and start.dtype == a.dtype == eps.dtype
                and select.numpy_state_allowed()):
            return _state_numpy(start, a, scale2, eps, levels, dtype)
        if start.is_cuda and select.triton_allowed():
            from n2uq.kernels import triton_ops

            if triton_ops.state_supported(a, dtype, start, eps, scale2, levels):
                a_pos, thresholds, breakpoints, slope, table = triton_ops.ltq_state(start, a, eps, scale2, levels)
                return LTQState(a_pos, thresholds, breakpoints, levels, table, slope)
        a_pos = torch.where(a > eps, a, eps)
        levels_c = levels.to(dtype)
        return LTQState(a_pos=a_pos, thresholds=ltq_forward_thresholds(start, a_pos).to(dtype),
                        breakpoints=ltq_breakpoints(start, a_pos).to(dtype), levels=levels_c,
                        table=levels_c * scale2.to(dtype), slope=((2.0 / a.numel()) / a_pos).to(dtype))


def _state_numpy(start: Tensor, a: Tensor, scale2: Tensor, eps: Tensor, levels: Tensor,
                 dtype: torch.dtype) -> LTQState:
    real = _NUMPY_DTYPES[a.dtype]
    a_np = a.detach().numpy()
    eps_v = eps.detach().numpy()[0]
    a_pos = np.where(a_np > eps_v, a_np, eps_v).astype(real, copy=False)
    half = a_pos / real(2)
    # np.cumsum adds one term at a time in the array's dtype: the order of the definitions' loops.
    thresholds = np.empty(a_pos.size, real)
    thresholds[0] = start.detach().numpy()[0] + half[0]
    thresholds[1:] = half[:-1] + half[1:]
    np.cumsum(thresholds, out=thresholds)
    breakpoints = np.empty(a_pos.size + 1, real)
    breakpoints[0] = start.detach().numpy()[0]
    breakpoints[1:] = a_pos
    np.cumsum(breakpoints, out=breakpoints)
    slope = (real(1) / a_pos) * real(2.0 / a_pos.size)  # `(2 / n) / a_pos`: torch's reciprocal, then multiply
    np_dtype = _NUMPY_DTYPES.get(dtype)
    levels_c = levels if levels.dtype == dtype else levels.to(dtype)

    def as_compute(v: np.ndarray) -> Tensor:
        return torch.from_numpy(v.astype(np_dtype, copy=False)) if np_dtype else torch.from_numpy(v).to(dtype)

    return LTQState(a_pos=torch.from_numpy(a_pos), thresholds=as_compute(thresholds),
                    breakpoints=as_compute(breakpoints), levels=levels_c,
                    table=levels_c * scale2.detach().to(dtype), slope=as_compute(slope))


def ltq_param_grads(sums: Tensor, state: LTQState, a: Tensor, eps: Tensor, scale2: Tensor,
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``start, a, scale1, scale2`` from the float64 sums of a backward pass.

    ``sums = [G(n), Q(n), S1, S2, ...]`` (see :mod:`n2uq.kernels.torch_ops`). With
    ``slope_k = interval / a⁺[k-1]``: ``W_k = Σ ∂L/∂xs = scale2·slope_k·G_k`` and
    ``R_k = Σ ∂L/∂xs·(xs - d[k-1]) = scale2·slope_k·Q_k`` over interval k; then
    ``∂/∂start = -Σ W``, ``∂/∂a⁺[j] = -R_j/a⁺[j] - Σ_{k>j} W_k``, masked to ``a > eps`` —
    the per-interval form of :meth:`n2uq.quant.LTQFunction.backward`.
    """
    n = a.numel()
    if sums.device.type == "cpu" and select.numpy_state_allowed():  # NumPy beats a dozen tiny torch ops
        return _param_grads_numpy(sums.numpy(), state, a, eps, scale2)
    if sums.is_cuda and select.triton_allowed():
        from n2uq.kernels import triton_ops

        if triton_ops.state_supported(a, state.slope.dtype, eps, scale2, state.levels):  # one launch
            return triton_ops.ltq_param_grads(sums, state.slope, state.a_pos, a, eps, scale2)
    coef = scale2.detach().double() * state.slope.double()
    w = coef * sums[:n]
    r = coef * sums[n : 2 * n]
    later = w.flip(0).cumsum(0).flip(0)  # later[j] = Σ_{k >= j} W[k]
    later = torch.cat([later[1:], later.new_zeros(1)])
    grad_a_pos = -r / state.a_pos.double() - later
    grad_a = torch.where(a > eps, grad_a_pos.to(a.dtype), torch.zeros_like(a))
    grad_start = (-w.sum()).to(a.dtype).reshape(1)
    return grad_start, grad_a, sums[2 * n].to(a.dtype).reshape(1), sums[2 * n + 1].to(a.dtype).reshape(1)


def _param_grads_numpy(sums: np.ndarray, state: LTQState, a: Tensor, eps: Tensor, scale2: Tensor):
    n = a.numel()
    coef = float(scale2.detach()) * state.slope.numpy().astype(np.float64)
    w = coef * sums[:n]
    r = coef * sums[n : 2 * n]
    later = np.zeros(n)
    np.cumsum(w[:0:-1], out=later[-2::-1])  # later[j] = sum of W[k] for k > j
    grad_a_pos = -r / state.a_pos.numpy().astype(np.float64) - later
    mask = a.detach().numpy() > eps.detach().numpy()
    out = np.empty(n + 3)
    out[0] = -w.sum()
    out[1 : n + 1] = np.where(mask, grad_a_pos, 0.0)
    out[n + 1 :] = sums[2 * n : 2 * n + 2]
    return tuple(torch.from_numpy(out).to(a.dtype).split([1, n, 1, 1]))  # views of one tensor
