"""Fused operators for the quantized blocks (SPEC §1, §2, §4).

A quantized stage of every N2UQ block is ``LearnableBias → PReLU → LearnableBias → LTQ →
HardQuantizeConv``. Run module by module, autograd keeps three full-size tensors per stage alive
for backward (the PReLU input, the LTQ input and the conv input) and sweeps memory ~10 times.
:func:`quant_stage` computes the same values with two operators:

* ``_LTQStage``: RPReLU and LTQ in one pass; saves only the stage input ``x`` and recomputes the
  chain in backward (bit-identical: the same IEEE operations in the same order), where one more
  pass yields the input gradient and every parameter gradient.
* ``_CodesConv``: the convolution saves its input as uint8 LTQ codes instead of float: the LTQ output
  is exactly ``table[code]``, so backward rebuilds it bit for bit (4× less memory).

:func:`rprelu` fuses the block-output RPReLU with the residual add (saves one tensor, as the PReLU
alone would, in one pass instead of four).

Forward values are bit-identical to the module-by-module computation and gradients agree to float
rounding; ``tests/test_fused.py`` checks both. The submodules keep their parameters (and the state
dict its layout); when a submodule is not of the expected type, has hooks, or no kernel applies,
these functions fall back to calling the modules (or to plain PyTorch recomputation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from n2uq.kernels import ops_for
from n2uq.quant import (
    LTQ,
    HardQuantizeConv,
    LearnableBias,
    _LTQFunction,
    ltq_codes,
    ltq_lookup,
    ltq_param_grads,
    ltq_state,
)

__all__ = ["quant_stage", "rprelu", "stage_output"]


def _plain(module: Optional[nn.Module], kind: type) -> bool:
    """Exactly ``kind`` (not a subclass) and without hooks, so skipping its forward is invisible."""
    if module is None:
        return True
    if type(module) is not kind:
        return False
    return not any(getattr(module, name, None) for name in ("_forward_hooks", "_forward_pre_hooks"))


def _vector(t: Optional[Tensor], channels: int, dtype: torch.dtype) -> Optional[Tensor]:
    """A per-channel parameter as a contiguous detached [C] vector (PReLU with one weight expanded)."""
    if t is None:
        return None
    return t.detach().reshape(-1).expand(channels).to(dtype).contiguous()


def _grad_like(sums: Tensor, param: Tensor) -> Tensor:
    """Per-channel float64 sums → gradient of ``param`` (summed over channels for a shared weight)."""
    if param.numel() == 1 and sums.numel() > 1:
        sums = sums.sum()
    return sums.to(param.dtype).reshape(param.shape)


# ---------------------------------------------------------------------------------------------
# RPReLU → LTQ
# ---------------------------------------------------------------------------------------------


def _chain_torch(x: Tensor, b1, w, b2) -> Tensor:
    """The RPReLU chain exactly as the modules compute it (SPEC §4)."""
    if b1 is None:
        return x
    return F.prelu(x + b1.expand_as(x), w) + b2.expand_as(x)


class _LTQStage(torch.autograd.Function):
    """``y = LTQ(b2 + prelu(x + b1))`` (chain optional); returns ``(y, codes or None, table)``."""

    @staticmethod
    def forward(ctx, x, b1, w, b2, start, a, scale1, scale2, eps, levels, want_codes):  # type: ignore[override]
        chain_params = [p for p in (b1, w, b2) if p is not None]
        dtype = torch.result_type(x, scale1)
        for p in chain_params:
            dtype = torch.promote_types(dtype, p.dtype)
        state = ltq_state(start, a, scale2, eps, levels, dtype)
        ops = ops_for(x, dtype) if x.dim() >= 2 and all(p.dtype == dtype for p in chain_params) else None
        chain = None
        if ops is not None and b1 is not None:
            chain = tuple(_vector(p, x.shape[1], dtype) for p in (b1, w, b2))
        if ops is not None:
            y, codes = ops.ltq_forward(x, chain, scale1, state.thresholds, state.table, want_codes)
        else:
            xs = _chain_torch(x, b1, w, b2) * scale1
            codes = ltq_codes(xs, state.thresholds)
            y = ltq_lookup(state.table, codes)
            codes = codes.to(torch.uint8) if want_codes else None
        ctx.save_for_backward(x, b1, w, b2, start, a, scale1, scale2, eps, levels)
        ctx.state, ctx.ops, ctx.chain = state, ops, chain
        outs = (y, codes, state.table)
        ctx.mark_non_differentiable(*[t for t in outs[1:] if t is not None])
        return outs

    @staticmethod
    def backward(ctx, grad, _grad_codes, _grad_table):  # type: ignore[override]
        x, b1, w, b2, start, a, scale1, scale2, eps, levels = ctx.saved_tensors
        if ctx.ops is None:
            return _LTQStage._backward_torch(ctx, grad)
        state = ctx.state
        gx, sums = ctx.ops.ltq_backward(x, grad, ctx.chain, scale1, scale2, state.thresholds,
                                        state.levels, state.breakpoints, state.slope)
        grad_start, grad_a, grad_s1, grad_s2 = ltq_param_grads(sums, state, a, eps, scale2)
        g_b1 = g_w = g_b2 = None
        if b1 is not None:
            n, channels = a.numel(), x.shape[1]
            per_channel = sums[2 * n + 2 :].reshape(3, channels)
            g_b2, g_w, g_b1 = (_grad_like(s, p) for s, p in zip(per_channel, (b2, w, b1)))
        return gx, g_b1, g_w, g_b2, grad_start, grad_a, grad_s1, grad_s2, None, None, None

    @staticmethod
    def _backward_torch(ctx, grad):
        """Recompute the chain with autograd (exactly the unfused graph) and differentiate it."""
        saved = ctx.saved_tensors
        inputs = [None if t is None else t.detach().requires_grad_(need) for t, need in
                  zip(saved, ctx.needs_input_grad)]
        x, b1, w, b2, start, a, scale1, scale2, eps, levels = inputs
        with torch.enable_grad():
            y = _LTQFunction.apply(_chain_torch(x, b1, w, b2), start, a, scale1, scale2, eps, levels)
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True))
        return (*[next(grads) if t is not None and t.requires_grad else None for t in inputs], None)


# ---------------------------------------------------------------------------------------------
# Convolution that keeps its input as LTQ codes
# ---------------------------------------------------------------------------------------------


def _decode(codes: Tensor, table: Tensor) -> Tensor:
    dense = codes.is_contiguous() or (codes.dim() == 4 and codes.is_contiguous(memory_format=torch.channels_last))
    ops = ops_for(table, table.dtype) if dense and codes.device == table.device else None
    if ops is not None:
        return ops.decode(codes, table)
    return table[codes.long()]


class _CodesConv(torch.autograd.Function):
    """``conv2d(y, weight)`` where ``y = table[codes]``; saves ``codes`` (uint8) instead of ``y``."""

    @staticmethod
    def forward(ctx, y, codes, table, weight, stride, padding, groups):  # type: ignore[override]
        out = F.conv2d(y, weight, None, stride, padding, 1, groups)
        ctx.save_for_backward(codes, table, weight)
        ctx.conf = (stride, padding, groups, y.dtype, out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        codes, table, weight = ctx.saved_tensors
        stride, padding, groups, y_dtype, conv_dtype = ctx.conf
        # Under autocast the forward ran the conv in `conv_dtype`; rebuild exactly what it used.
        y = _decode(codes, table).to(conv_dtype)
        need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        stride, padding = list(F._pair(stride)), list(F._pair(padding))
        g_y, g_w, _ = torch.ops.aten.convolution_backward(
            grad.to(conv_dtype), y, weight.to(conv_dtype), None, stride, padding, [1, 1], False, [0, 0],
            groups, [need_y, need_w, False])
        g_y = g_y.to(y_dtype) if need_y else None
        g_w = g_w.to(weight.dtype) if need_w else None
        return g_y, None, None, g_w, None, None, None


# ---------------------------------------------------------------------------------------------
# Module-level entry points used by the blocks' forward methods
# ---------------------------------------------------------------------------------------------


def quant_stage(x: Tensor, bias1: Optional[LearnableBias], prelu: Optional[nn.PReLU],
                bias2: Optional[LearnableBias], quan: LTQ, conv: HardQuantizeConv) -> Tensor:
    """``conv(quan(bias2(prelu(bias1(x)))))`` (chain modules may be ``None``: ``conv(quan(x))``).

    Fused (see module docstring) when the modules are the plain N2UQ ones; else module by module.
    """
    chain = (bias1, prelu, bias2)
    fusable = (_plain(bias1, LearnableBias) and _plain(prelu, nn.PReLU) and _plain(bias2, LearnableBias)
               and _plain(quan, LTQ) and _plain(conv, HardQuantizeConv)
               and (all(m is None for m in chain) or all(m is not None for m in chain))
               and x.dim() == 4)
    if not fusable:
        for module in chain:
            if module is not None:
                x = module(x)
        return conv(quan(x))
    y, codes, table = stage_output(x, bias1, prelu, bias2, quan, want_codes=torch.is_grad_enabled())
    if codes is None:
        return conv(y)
    return _CodesConv.apply(y, codes, table, conv.quantized_weight(), conv.stride, conv.padding, conv.groups)


def stage_output(x: Tensor, bias1: Optional[LearnableBias], prelu: Optional[nn.PReLU],
                 bias2: Optional[LearnableBias], quan: LTQ, want_codes: bool = False):
    """``(quan(bias2(prelu(bias1(x)))), uint8 codes or None, level table)`` in one fused operator."""
    b1 = bias1.bias if bias1 is not None else None
    w = prelu.weight if prelu is not None else None
    b2 = bias2.bias if bias2 is not None else None
    return _LTQStage.apply(x, b1, w, b2, quan.start, quan.a, quan.scale1, quan.scale2, quan.eps, quan.levels,
                           want_codes)


class _RPReLU(torch.autograd.Function):
    """``y = prelu((x + residual) + b1, w) + b2``; saves ``z = (x + residual) + b1`` only."""

    @staticmethod
    def forward(ctx, x, residual, b1, w, b2, ops, dtype):  # type: ignore[override]
        chain = tuple(_vector(p, x.shape[1], dtype) for p in (b1, w, b2))
        y, z = ops.rprelu_forward(x, residual, chain)
        ctx.save_for_backward(z, b1, w, b2)
        ctx.ops, ctx.weight = ops, chain[1]
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, b1, w, b2 = ctx.saved_tensors
        gx, sums = ctx.ops.rprelu_backward(grad, z, ctx.weight)
        g_b2, g_w, g_b1 = (_grad_like(s, p) for s, p in zip(sums.reshape(3, -1), (b2, w, b1)))
        x_dtype, r_dtype = ctx.dtypes
        g_r = None if r_dtype is None else gx.to(r_dtype)
        return gx.to(x_dtype), g_r, g_b1, g_w, g_b2, None, None


def rprelu(x: Tensor, bias1: LearnableBias, prelu: nn.PReLU, bias2: LearnableBias,
           residual: Optional[Tensor] = None) -> Tensor:
    """``bias2(prelu(bias1(x + residual)))`` — the block-output RPReLU (SPEC §4, §5), fused."""
    ops = None
    if (_plain(bias1, LearnableBias) and _plain(prelu, nn.PReLU) and _plain(bias2, LearnableBias)
            and x.dim() == 4 and (residual is None or (residual.shape == x.shape
                                                       and residual.stride() == x.stride()))):
        dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        for p in (bias1.bias, prelu.weight, bias2.bias):
            dtype = torch.promote_types(dtype, p.dtype)
        ops = ops_for(x, dtype)
        if ops is not None and residual is not None and not ops.supports(residual, dtype):
            ops = None
    if ops is None:
        return bias2(prelu(bias1(x if residual is None else x + residual)))
    return _RPReLU.apply(x, residual, bias1.bias, prelu.weight, bias2.bias, ops, dtype)
