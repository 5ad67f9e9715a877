"""The fast N2UQ operators as ``torch.library`` custom ops (SPEC §1, §2, §4).

Under ``torch.compile`` each operator is one opaque op (a fake implementation gives its output
shapes, ``register_autograd`` its backward, itself one more op), so compiled models trace through
them without graph breaks or recompilations. Eager calls go through an equivalent
``torch.autograd.Function`` that runs the same implementation functions (the dispatcher round trip
of a Python custom op costs ~100 µs per call, more than a small LTQ takes). Inside, an operator
takes the C kernels on CPU, the Triton kernels on CUDA, or plain PyTorch (``N2UQ_KERNELS=torch`` or
where no kernel applies), always with the same values:

* ``n2uq::ltq_stage`` — ``LTQ(b2 + prelu(x + b1))`` (the chain optional: a plain LTQ), returning
  the output, its uint8 codes if asked and the level table; saves only ``x`` and the parameters.
* ``n2uq::rprelu`` — the block-output RPReLU with its residual add; saves ``z = (x + r) + b1``.
* ``n2uq::decode_codes`` — ``table[codes]``, the exact LTQ output rebuilt from its codes.
* ``n2uq::weight_ste`` — HardQuantizeConv's ``(Wq - Ws) + Ws`` in one pass (gradient ``1/s``).

Outputs have the memory layout of ``torch.empty_like(input)`` (what the fake implementations
promise), whatever path computed them.
"""

from typing import Optional, Tuple  # real types, not strings: custom_op reads these annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from n2uq import quant as Q
from n2uq.kernels import ops_for

__all__ = ["ltq_stage", "rprelu", "decode_codes", "weight_ste"]

_EMPTY = (0,)


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype PyTorch's elementwise ops would compute in (``x`` first, then the parameters)."""
    present = [t for t in tensors if t is not None]
    dtype = torch.result_type(present[0], present[1]) if len(present) > 1 else present[0].dtype
    for t in present[2:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _as_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with the strides ``torch.empty_like(like)`` would have (a copy only if they differ)."""
    if t.stride() == like.stride():  # the usual case: same shape, same dense layout
        return t
    ref = torch.empty_like(like, dtype=t.dtype)
    return t if t.stride() == ref.stride() else ref.copy_(t)


def _vector(t: Optional[Tensor], channels: int, dtype: torch.dtype) -> Optional[Tensor]:
    """A per-channel parameter as a contiguous [C] vector (PReLU with one weight expanded)."""
    if t is None:
        return None
    return t.detach().reshape(-1).expand(channels).to(dtype).contiguous()


def _grad_like(sums: Tensor, param: Tensor) -> Tensor:
    """Per-channel sums → gradient of ``param`` (summed over channels for a shared weight), as a
    tensor of its own (outputs of a custom op may not alias each other)."""
    if param.numel() == 1 and sums.numel() > 1:
        sums = sums.sum()
    return sums.to(param.dtype, copy=True).reshape(param.shape)


def _chain_torch(x: Tensor, b1: Optional[Tensor], w: Optional[Tensor], b2: Optional[Tensor]) -> Tensor:
    """The RPReLU chain exactly as the modules compute it (SPEC §4)."""
    if b1 is None:
        return x
    return F.prelu(x + b1.expand_as(x), w) + b2.expand_as(x)


def _prelu_backward_torch(grad: Tensor, z: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """PReLU's backward at input ``z``: ``(grad of z, float64 per-channel grad of w)``."""
    positive = z > 0
    w_b = w.reshape(-1).expand(z.shape[1]).reshape([1, -1] + [1] * (z.dim() - 2))
    g_w = _channel_sums(torch.where(positive, torch.zeros_like(grad), z * grad))
    return torch.where(positive, grad, w_b * grad), g_w


def _channel_sums(t: Tensor) -> Tensor:
    """Float64 sums over every dimension but 1 (the channel)."""
    return t.sum(dim=[d for d in range(t.dim()) if d != 1], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# RPReLU → LTQ
# ---------------------------------------------------------------------------------------------


def _stage_setup(x, b1, w, b2, start, a, scale1, scale2, eps, levels):
    """Compute dtype, LTQ state, kernel module (or None) and chain vectors of one stage call."""
    dtype = _compute_dtype(x, scale1, b1, w, b2)
    state = Q.ltq_state(start, a, scale2, eps, levels, dtype)
    chain_params = [p for p in (b1, w, b2) if p is not None]
    ops = None
    if (b1 is None or x.dim() >= 2) and all(p.dtype == dtype for p in chain_params):
        ops = ops_for(x, dtype)
        if ops is not None and a.numel() > getattr(ops, "MAX_THRESHOLDS", a.numel()):
            ops = None
    chain = None
    if ops is not None and b1 is not None:
        chain = tuple(_vector(p, x.shape[1], dtype) for p in (b1, w, b2))
    return dtype, state, ops, chain


#: ``out_code`` of :func:`ltq_stage`: the stage output in the compute dtype, or rounded to a half type.
_OUT_DTYPES = {0: None, 1: torch.bfloat16, 2: torch.float16}


def _stage_forward(x, b1, w, b2, scale1, setup, want_codes: bool, out_code: int):
    """``(y, uint8 codes or None, level table)`` of one stage (setup from :func:`_stage_setup`)."""
    dtype, state, ops, chain = setup
    out_dtype = _OUT_DTYPES[out_code] or dtype
    if ops is not None:
        y, codes = ops.ltq_forward(x, chain, scale1.detach(), state.thresholds, state.table, want_codes, out_dtype)
    else:
        xs = _chain_torch(x, b1, w, b2) * scale1
        codes = Q.ltq_codes(xs, state.thresholds)
        y = Q.ltq_lookup(state.table, codes).to(out_dtype)
        codes = codes.to(torch.uint8) if want_codes else None
    return _as_layout_of(y, x), (None if codes is None else _as_layout_of(codes, x)), state.table


def _stage_backward(grad, x, b1, w, b2, start, a, scale1, scale2, eps, setup):
    """Gradients of ``x, b1, w, b2, start, a, scale1, scale2`` (``None`` for an absent chain)."""
    _, state, ops, chain = setup
    g_chain = (None, None, None)
    if ops is not None:
        gx, sums = ops.ltq_backward(x, grad, chain, scale1.detach(), scale2.detach(), state.thresholds,
                                    state.levels, state.breakpoints, state.slope)
        g_start, g_a, g_s1, g_s2 = Q.ltq_param_grads(sums, state, a, eps, scale2)
        if b1 is not None:
            n = a.numel()
            g_b2, g_w, g_b1 = sums[2 * n + 2 :].reshape(3, x.shape[1])
            g_chain = (g_b1, g_w, g_b2)
    else:
        with torch.no_grad():
            z2 = _chain_torch(x, b1, w, b2)
            gx, g_start, g_a, g_s1, g_s2 = Q.ltq_grads_torch(grad, z2, a, scale1, scale2, eps, state)
            if b1 is not None:  # back through b2 + prelu(z1, w), z1 = x + b1
                g_b2 = _channel_sums(gx)
                gx, g_w = _prelu_backward_torch(gx, x + b1.expand_as(x), w)
                g_chain = (_channel_sums(gx), g_w, g_b2)
    g_chain = tuple(None if g is None else _grad_like(g, p) for g, p in zip(g_chain, (b1, w, b2)))
    params = tuple(_grad_like(g, p) for g, p in zip((g_start, g_a, g_s1, g_s2), (start, a, scale1, scale2)))
    return (_as_layout_of(gx.to(x.dtype), x), *g_chain, *params)


class _Stage(torch.autograd.Function):
    """Eager form of ``n2uq::ltq_stage``: the LTQ state computed in forward is reused in backward."""

    @staticmethod
    def forward(ctx, x, b1, w, b2, start, a, scale1, scale2, eps, levels, want_codes, out_code):  # type: ignore[override]
        setup = _stage_setup(x, b1, w, b2, start, a, scale1, scale2, eps, levels)
        y, codes, table = _stage_forward(x, b1, w, b2, scale1, setup, want_codes, out_code)
        ctx.save_for_backward(x, b1, w, b2, start, a, scale1, scale2, eps)
        ctx.setup = setup
        ctx.mark_non_differentiable(*[t for t in (codes, table) if t is not None])
        return y, codes, table

    @staticmethod
    def backward(ctx, grad, _grad_codes, _grad_table):  # type: ignore[override]
        x, b1, w, b2, start, a, scale1, scale2, eps = ctx.saved_tensors
        grads = _stage_backward(grad, x, b1, w, b2, start, a, scale1, scale2, eps, ctx.setup)
        return (*grads, None, None, None, None)


@torch.library.custom_op("n2uq::ltq_stage", mutates_args=())
def _ltq_stage_op(x: Tensor, b1: Optional[Tensor], w: Optional[Tensor], b2: Optional[Tensor], start: Tensor,
                  a: Tensor, scale1: Tensor, scale2: Tensor, eps: Tensor, levels: Tensor,
                  want_codes: bool, out_code: int) -> Tuple[Tensor, Tensor, Tensor]:
    setup = _stage_setup(x, b1, w, b2, start, a, scale1, scale2, eps, levels)
    y, codes, table = _stage_forward(x, b1, w, b2, scale1, setup, want_codes, out_code)
    return y, (x.new_empty(_EMPTY, dtype=torch.uint8) if codes is None else codes), table


@_ltq_stage_op.register_fake
def _(x, b1, w, b2, start, a, scale1, scale2, eps, levels, want_codes, out_code):
    dtype = _compute_dtype(x, scale1, b1, w, b2)
    codes = torch.empty_like(x, dtype=torch.uint8) if want_codes else x.new_empty(_EMPTY, dtype=torch.uint8)
    y = torch.empty_like(x, dtype=_OUT_DTYPES[out_code] or dtype)
    return y, codes, levels.new_empty(levels.shape, dtype=dtype)


@torch.library.custom_op("n2uq::ltq_stage_backward", mutates_args=())
def _ltq_stage_backward_op(grad: Tensor, x: Tensor, b1: Optional[Tensor], w: Optional[Tensor],
                           b2: Optional[Tensor], start: Tensor, a: Tensor, scale1: Tensor, scale2: Tensor,
                           eps: Tensor, levels: Tensor
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    setup = _stage_setup(x, b1, w, b2, start, a, scale1, scale2, eps, levels)
    grads = _stage_backward(grad, x, b1, w, b2, start, a, scale1, scale2, eps, setup)
    return tuple(x.new_empty(_EMPTY) if g is None else g for g in grads)


@_ltq_stage_backward_op.register_fake
def _(grad, x, b1, w, b2, start, a, scale1, scale2, eps, levels):
    chain = tuple(x.new_empty(_EMPTY) if p is None else torch.empty_like(p) for p in (b1, w, b2))
    return (torch.empty_like(x), *chain, *(torch.empty_like(p) for p in (start, a, scale1, scale2)))


def _stage_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10])
    ctx.grad_dtype = _compute_dtype(*inputs[:1], inputs[6], *inputs[1:4])


def _stage_grad(ctx, grad, _grad_codes, _grad_table):
    x, b1, w, b2, start, a, scale1, scale2, eps, levels = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(x, dtype=ctx.grad_dtype)
    gx, g_b1, g_w, g_b2, g_start, g_a, g_s1, g_s2 = _ltq_stage_backward_op(
        grad, x, b1, w, b2, start, a, scale1, scale2, eps, levels)
    chain = [None if p is None else g for g, p in zip((g_b1, g_w, g_b2), (b1, w, b2))]
    return (gx, *chain, g_start, g_a, g_s1, g_s2, None, None, None, None)


_ltq_stage_op.register_autograd(_stage_grad, setup_context=_stage_setup_context)


def ltq_stage(x: Tensor, b1: Optional[Tensor], w: Optional[Tensor], b2: Optional[Tensor], start: Tensor,
              a: Tensor, scale1: Tensor, scale2: Tensor, eps: Tensor, levels: Tensor,
              want_codes: bool = False, out_code: int = 0) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """``(LTQ(b2 + prelu(x + b1)), uint8 codes or None, level table)``; ``b1 = w = b2 = None``: plain LTQ.

    ``out_code`` 1 / 2 returns the output rounded to bfloat16 / float16 (what autocast would cast it to
    for the next convolution: one pass less); its gradient is the same."""
    if torch.compiler.is_compiling():
        y, codes, table = _ltq_stage_op(x, b1, w, b2, start, a, scale1, scale2, eps, levels, want_codes, out_code)
        return y, (codes if want_codes else None), table
    return _Stage.apply(x, b1, w, b2, start, a, scale1, scale2, eps, levels, want_codes, out_code)


# ---------------------------------------------------------------------------------------------
# Block-output RPReLU with the residual add
# ---------------------------------------------------------------------------------------------


def _rprelu_ops(x: Tensor, residual: Optional[Tensor], dtype: torch.dtype):
    if x.dim() != 4 or (residual is not None and (residual.shape != x.shape or residual.stride() != x.stride())):
        return None
    ops = ops_for(x, dtype)
    if ops is not None and residual is not None and not ops.supports(residual, dtype):
        return None
    return ops


def _rprelu_forward(x, residual, b1, w, b2, want_z: bool):
    """``y = prelu((x + residual) + b1, w) + b2`` and (for backward) ``z = (x + residual) + b1`` or None."""
    dtype = _compute_dtype(x, residual, b1, w, b2)
    ops = _rprelu_ops(x, residual, dtype)
    if ops is not None:
        chain = tuple(_vector(p, x.shape[1], dtype) for p in (b1, w, b2))
        y, z = ops.rprelu_forward(x, residual, chain, want_z)
    else:
        with torch.no_grad():
            v = x if residual is None else x + residual
            z = v + b1.expand_as(v)
            y = F.prelu(z, w) + b2.expand_as(z)
    return _as_layout_of(y, x), (_as_layout_of(z, x) if want_z else None)


def _rprelu_backward(grad, z, w):
    """``(grad of (x + residual), float64 [grad b2, grad w, grad b1] per channel [3, C])``."""
    ops = _rprelu_ops(z, None, z.dtype)
    if ops is not None:
        gx, sums = ops.rprelu_backward(grad, z, _vector(w, z.shape[1], z.dtype))
        return _as_layout_of(gx, z), sums.reshape(3, z.shape[1])
    with torch.no_grad():
        gx, g_w = _prelu_backward_torch(grad, z, w)
        return _as_layout_of(gx.to(z.dtype), z), torch.stack([_channel_sums(grad), g_w, _channel_sums(gx)])


def _rprelu_param_grads(sums, b1, w, b2):
    g_b2, g_w, g_b1 = (_grad_like(s, p) for s, p in zip(sums, (b2, w, b1)))
    return g_b1, g_w, g_b2


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
    return y, (x.new_empty(_EMPTY, dtype=y.dtype) if z is None else z)


@_rprelu_op.register_fake
def _(x, residual, b1, w, b2, want_z):
    dtype = _compute_dtype(x, residual, b1, w, b2)
    z = torch.empty_like(x, dtype=dtype) if want_z else x.new_empty(_EMPTY, dtype=dtype)
    return torch.empty_like(x, dtype=dtype), z


@torch.library.custom_op("n2uq::rprelu_backward", mutates_args=())
def _rprelu_backward_op(grad: Tensor, z: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    return _rprelu_backward(grad, z, w)


@_rprelu_backward_op.register_fake
def _(grad, z, w):
    return torch.empty_like(z), z.new_empty((3, z.shape[1]), dtype=torch.float64)


def _rprelu_setup_context(ctx, inputs, output):
    x, residual, b1, w, b2, _ = inputs
    ctx.save_for_backward(output[1], b1, w, b2)
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)


def _rprelu_grad(ctx, grad, _grad_z):
    z, b1, w, b2 = ctx.saved_tensors
    gx, sums = _rprelu_backward_op(grad if grad is not None else torch.zeros_like(z), z, w)
    x_dtype, r_dtype = ctx.dtypes
    return (gx.to(x_dtype), None if r_dtype is None else gx.to(r_dtype), *_rprelu_param_grads(sums, b1, w, b2),
            None)


_rprelu_op.register_autograd(_rprelu_grad, setup_context=_rprelu_setup_context)


def rprelu(x: Tensor, residual: Optional[Tensor], b1: Tensor, w: Tensor, b2: Tensor) -> Tensor:
    """``b2 + prelu((x + residual) + b1, w)`` (SPEC §4), saving one tensor for backward (none, and
    not even computing it, when no gradient is wanted)."""
    want_z = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, b1, w, b2))
    if torch.compiler.is_compiling():
        return _rprelu_op(x, residual, b1, w, b2, want_z)[0]
    return _RPReLU.apply(x, residual, b1, w, b2, want_z)


# ---------------------------------------------------------------------------------------------
# Codes → values, and the quantized weight
# ---------------------------------------------------------------------------------------------


def _decode(codes: Tensor, table: Tensor) -> Tensor:
    dense = codes.is_contiguous() or Q.memory_order(codes) is not None
    ops = ops_for(table, table.dtype) if dense and codes.device == table.device else None
    y = ops.decode(codes, table) if ops is not None else Q.ltq_lookup(table, codes.long())
    return _as_layout_of(y, codes)


@torch.library.custom_op("n2uq::decode_codes", mutates_args=())
def _decode_op(codes: Tensor, table: Tensor) -> Tensor:
    return _decode(codes, table)


@_decode_op.register_fake
def _(codes, table):
    return torch.empty_like(codes, dtype=table.dtype)


def decode_codes(codes: Tensor, table: Tensor) -> Tensor:
    """``table[codes]`` for uint8 LTQ codes: the exact LTQ output (SPEC §1)."""
    return _decode_op(codes, table) if torch.compiler.is_compiling() else _decode(codes, table)


def _weight_value(weight: Tensor, s: Tensor, half: Tensor, steps: Tensor) -> Tensor:
    ops = ops_for(weight, torch.float32)
    if ops is not None and hasattr(ops, "weight_ste") and half.dtype == torch.float32:
        return ops.weight_ste(weight.detach(), s, half, steps)
    return Q.quantized_weight_value(weight, s, half, steps)


class _WeightSTE(torch.autograd.Function):
    """Eager form of ``n2uq::weight_ste``."""

    @staticmethod
    def forward(ctx, weight, s, half, steps):  # type: ignore[override]
        ctx.save_for_backward(s)
        return _weight_value(weight, s, half, steps)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (s,) = ctx.saved_tensors
        return grad / s, None, None, None


@torch.library.custom_op("n2uq::weight_ste", mutates_args=())
def _weight_ste_op(weight: Tensor, s: Tensor, half: Tensor, steps: Tensor) -> Tensor:
    return _weight_value(weight, s, half, steps)


@_weight_ste_op.register_fake
def _(weight, s, half, steps):
    return torch.empty_like(weight)


def _weight_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _weight_grad(ctx, grad):
    (s,) = ctx.saved_tensors
    return grad / s, None, None, None


_weight_ste_op.register_autograd(_weight_grad, setup_context=_weight_setup_context)


def weight_ste(weight: Tensor, s: Tensor, half: Tensor, steps: Tensor) -> Tensor:
    """Value of HardQuantizeConv's ``(Wq - Ws) + Ws`` in one pass (SPEC §2); gradient ``grad / s``,
    as autograd of ``Ws = W / s``."""
    if torch.compiler.is_compiling():
        return _weight_ste_op(weight, s, half, steps)
    return _WeightSTE.apply(weight, s, half, steps)
