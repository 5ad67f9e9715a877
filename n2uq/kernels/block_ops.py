"""The other fused operators of the quantized blocks, as ``torch.library`` custom ops.

* ``n2uq::rprelu`` — the block-output RPReLU with its residual add; saves ``z = (x + r) + b1``.
* ``n2uq::decode_codes`` — ``table[codes]``, the exact LTQ output rebuilt from its uint8 codes.
* ``n2uq::weight_ste`` — HardQuantizeConv's ``(W_q - W_s) + W_s`` in one pass (gradient ``1/s``).

As in :mod:`n2uq.kernels.ltq_op`: custom ops under ``torch.compile``, equivalent autograd
Functions in eager, the implementation chosen by :func:`n2uq.kernels.select.implementation`, and
outputs in the layout of ``torch.empty_like(input)``.
"""

from __future__ import annotations

from typing import Optional, Tuple  # real types, not strings: custom_op reads these annotations

import torch
from torch import Tensor

from n2uq.kernels import select, torch_ops
from n2uq.kernels.layout import as_layout_of, memory_order
from n2uq.kernels.op_utils import EMPTY, ChainSums, channel_vector, compute_dtype, grad_like
from n2uq.quant import quantize_weight, weight_scale

__all__ = ["rprelu", "decode_codes", "weight_ste"]


# ---------------------------------------------------------------------------------------------
# Block-output RPReLU with the residual add
# ---------------------------------------------------------------------------------------------


def _rprelu_impl(x: Tensor, residual: Optional[Tensor], dtype: torch.dtype, params):
    """The implementation for ``x`` (and ``residual``, which the kernels read with ``x``'s strides)."""
    if x.dim() != 4 or (residual is not None and (residual.shape != x.shape or residual.stride() != x.stride())):
        return torch_ops
    impl = select.implementation(x, dtype, params=params)
    if residual is not None and impl is not torch_ops and not impl.supports(residual, dtype):
        return torch_ops
    return impl


def _rprelu_forward(x, residual, b1, w, b2, want_z: bool):
    """``y = prelu((x + residual) + b1, w) + b2`` and (for backward) ``z = (x + residual) + b1`` or None."""
    dtype = compute_dtype(x, residual, b1, w, b2)
    impl = _rprelu_impl(x, residual, dtype, (b1, w, b2))
    chain = tuple(channel_vector(p, x.shape[1], dtype) for p in (b1, w, b2))
    y, z = impl.rprelu_forward(x, residual, chain, want_z)
    return as_layout_of(y, x), (as_layout_of(z, x) if want_z else None)


def _rprelu_backward(grad, z, w) -> tuple[Tensor, ChainSums]:
    """``(grad of (x + residual), float64 per-channel sums of the parameters' gradients)``."""
    impl = _rprelu_impl(z, None, z.dtype, ())
    gx, sums = impl.rprelu_backward(grad, z, channel_vector(w, z.shape[1], z.dtype))
    return as_layout_of(gx, z), sums


def _rprelu_param_grads(sums: ChainSums, b1, w, b2):
    return tuple(grad_like(s, p) for s, p in zip(sums, (b1, w, b2)))


class _RPReLU(torch.autograd.Function):
    """Eager form of ``n2uq::rprelu``."""

    @staticmethod
    def forward(ctx, x, residual, b1, w, b2, want_z):  # type: ignore[override]
        y, z = _rprelu_forward(x, residual, b1, w, b2, want_z)
        ctx.save_for_backward(z, b1, w, b2)
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, b1, w, b2 = ctx.saved_tensors
        gx, sums = _rprelu_backward(grad, z, w)
        x_dtype, r_dtype = ctx.dtypes
        return (gx.to(x_dtype), None if r_dtype is None else gx.to(r_dtype), *_rprelu_param_grads(sums, b1, w, b2),
                None)


@torch.library.custom_op("n2uq::rprelu", mutates_args=())
def _rprelu_op(x: Tensor, residual: Optional[Tensor], b1: Tensor, w: Tensor, b2: Tensor,
               want_z: bool) -> Tuple[Tensor, Tensor]:
    y, z = _rprelu_forward(x, residual, b1, w, b2, want_z)
    return y, (x.new_empty(EMPTY, dtype=y.dtype) if z is None else z)


@_rprelu_op.register_fake
def _(x, residual, b1, w, b2, want_z):
    dtype = compute_dtype(x, residual, b1, w, b2)
    z = torch.empty_like(x, dtype=dtype) if want_z else x.new_empty(EMPTY, dtype=dtype)
    return torch.empty_like(x, dtype=dtype), z


@torch.library.custom_op("n2uq::rprelu_backward", mutates_args=())
def _rprelu_backward_op(grad: Tensor, z: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """``(grad of (x + residual), [3, C]: the fields of ChainSums stacked in their order)``."""
    gx, sums = _rprelu_backward(grad, z, w)
    return gx, torch.stack(list(sums))


@_rprelu_backward_op.register_fake
def _(grad, z, w):
    return torch.empty_like(z), z.new_empty((3, z.shape[1]), dtype=torch.float64)


def _rprelu_setup_context(ctx, inputs, output):
    x, residual, b1, w, b2, _ = inputs
    ctx.save_for_backward(output[1], b1, w, b2)
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)


def _rprelu_grad(ctx, grad, _grad_z):
    z, b1, w, b2 = ctx.saved_tensors
    gx, stacked = _rprelu_backward_op(grad if grad is not None else torch.zeros_like(z), z, w)
    x_dtype, r_dtype = ctx.dtypes
    return (gx.to(x_dtype), None if r_dtype is None else gx.to(r_dtype),
            *_rprelu_param_grads(ChainSums(*stacked), b1, w, b2), None)


_rprelu_op.register_autograd(_rprelu_grad, setup_context=_rprelu_setup_context)


def rprelu(x: Tensor, residual: Optional[Tensor], b1: Tensor, w: Tensor, b2: Tensor) -> Tensor:
    """``b2 + prelu((x + residual) + b1, w)``, saving one tensor for backward (none, and not even
    computing it, when no gradient is wanted)."""
    want_z = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, b1, w, b2))
    if torch.compiler.is_compiling():
        return _rprelu_op(x, residual, b1, w, b2, want_z)[0]
    return _RPReLU.apply(x, residual, b1, w, b2, want_z)


# ---------------------------------------------------------------------------------------------
# Codes → values
# ---------------------------------------------------------------------------------------------


def _decode(codes: Tensor, table: Tensor) -> Tensor:
    dense = codes.is_contiguous() or memory_order(codes) is not None
    impl = select.implementation(table, table.dtype) if dense and codes.device == table.device else torch_ops
    return as_layout_of(impl.decode(codes, table), codes)


@torch.library.custom_op("n2uq::decode_codes", mutates_args=())
def _decode_op(codes: Tensor, table: Tensor) -> Tensor:
    return _decode(codes, table)


@_decode_op.register_fake
def _(codes, table):
    return torch.empty_like(codes, dtype=table.dtype)


def decode_codes(codes: Tensor, table: Tensor) -> Tensor:
    """``table[codes]`` for uint8 LTQ codes: the exact LTQ output."""
    return _decode_op(codes, table) if torch.compiler.is_compiling() else _decode(codes, table)


# ---------------------------------------------------------------------------------------------
# The quantized weight
# ---------------------------------------------------------------------------------------------


def _weight_value(weight: Tensor, s: Tensor, clip_val: Tensor, n_bit: int) -> Tensor:
    """The value of :meth:`n2uq.quant.HardQuantizeConv.quantized_weight` (``s``: its scale), in one C
    pass on CPU float32, else through the definition."""
    with torch.no_grad():
        impl = select.implementation(weight, torch.float32)
        if hasattr(impl, "weight_ste") and weight.dtype == clip_val.dtype == torch.float32:
            return impl.weight_ste(weight, s, clip_val / 2, (2**n_bit - 1) / clip_val)
        q = quantize_weight(weight, s, n_bit, clip_val)
        return (q.quantized - q.scaled) + q.scaled


class _WeightSTE(torch.autograd.Function):
    """Eager form of ``n2uq::weight_ste``."""

    @staticmethod
    def forward(ctx, weight, clip_val, n_bit):  # type: ignore[override]
        s = weight_scale(weight, n_bit)  # [out, 1, 1, 1]
        ctx.save_for_backward(s)
        return _weight_value(weight, s, clip_val, n_bit)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (s,) = ctx.saved_tensors
        return grad / s, None, None


@torch.library.custom_op("n2uq::weight_ste", mutates_args=())
def _weight_ste_op(weight: Tensor, clip_val: Tensor, n_bit: int) -> Tensor:
    return _weight_value(weight, weight_scale(weight, n_bit), clip_val, n_bit)


@_weight_ste_op.register_fake
def _(weight, clip_val, n_bit):
    return torch.empty_like(weight)


def _weight_setup_context(ctx, inputs, output):
    weight, _, n_bit = inputs
    ctx.save_for_backward(weight_scale(weight, n_bit))


def _weight_grad(ctx, grad):
    (s,) = ctx.saved_tensors
    return grad / s, None, None


_weight_ste_op.register_autograd(_weight_grad, setup_context=_weight_setup_context)


def weight_ste(weight: Tensor, clip_val: Tensor, n_bit: int) -> Tensor:
    """HardQuantizeConv's weight ``(W_q - W_s) + W_s`` in one pass where a kernel exists; gradient
    ``grad / s`` (the straight-through estimator), as autograd of ``W_s = W / s`` gives."""
    if torch.compiler.is_compiling():
        return _weight_ste_op(weight, clip_val, n_bit)
    return _WeightSTE.apply(weight, clip_val, n_bit)
