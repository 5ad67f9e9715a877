"""``n2uq::ltq_stage``: RPReLU → LTQ in one operator that saves only its input.

``ltq_stage(x, b1, w, b2, start, a, scale1, scale2, eps, levels)`` is
``LTQ(b2 + prelu(x + b1, w))`` (``b1 = w = b2 = None``: a plain LTQ) with the G-STE backward of
:class:`n2uq.quant.LTQFunction`. Backward recomputes the chain from ``x`` (bit-identical: the same
IEEE operations in the same order) and yields, in one more pass, the input gradient and the sums
G-STE needs (:class:`n2uq.quant.GSTESums`); the parameter gradients come from those sums through
the definitions' own :func:`n2uq.quant.gste_param_grads`. The implementation (C, Triton or plain PyTorch) comes from
:func:`n2uq.kernels.select.implementation`.

Under ``torch.compile`` the operator is a ``torch.library`` custom op (a fake implementation gives
its output shapes, ``register_autograd`` its backward, itself one more op), so compiled models
trace through it without graph breaks or recompilations. Eager calls go through an equivalent
``torch.autograd.Function`` running the same functions (the dispatcher round trip of a Python
custom op costs ~100 µs per call, more than a small LTQ takes).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple  # real types, not strings: custom_op reads these annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from n2uq import quant as definitions  # looked up at each call: an edited formula reaches the fast path
from n2uq.kernels import select
from n2uq.kernels.layout import as_layout_of
from n2uq.kernels.ltq_state import LTQState, ltq_state
from n2uq.kernels.op_utils import EMPTY, channel_vector, compute_dtype, grad_like

__all__ = ["ltq_stage"]

#: ``out_code`` of :func:`ltq_stage`: the output in the compute dtype, or rounded to a half type.
_OUT_DTYPES = {0: None, 1: torch.bfloat16, 2: torch.float16}


class _Setup(NamedTuple):
    """What one call of the stage needs, derived once from its inputs."""

    dtype: torch.dtype
    state: LTQState
    impl: object  # the implementation module (cpu, triton_ops or torch_ops)
    chain: Optional[Tuple[Tensor, Tensor, Tensor]]  # [C] vectors of b1, w, b2, or None


def _setup(x, b1, w, b2, start, a, scale1, scale2, eps, levels) -> _Setup:
    dtype = compute_dtype(x, scale1, b1, w, b2)
    params = [p for p in (b1, w, b2) if p is not None]
    impl = select.implementation(x, dtype, n_thresholds=a.numel(), params=params)
    chain = None if b1 is None else tuple(channel_vector(p, x.shape[1], dtype) for p in (b1, w, b2))
    return _Setup(dtype, ltq_state(start, a, scale2, eps, levels, dtype), impl, chain)


def _forward(x, scale1, setup: _Setup, want_codes: bool, out_code: int):
    """``(y, uint8 codes or None, level table)`` of one stage."""
    out_dtype = _OUT_DTYPES[out_code] or setup.dtype
    state = setup.state
    y, codes = setup.impl.ltq_forward(x, setup.chain, scale1.detach(), state.thresholds, state.table,
                                      want_codes, out_dtype)
    return as_layout_of(y, x), (None if codes is None else as_layout_of(codes, x)), state.table


def _backward(grad, x, b1, w, b2, start, a, scale1, scale2, eps, setup: _Setup):
    """Gradients of ``x, b1, w, b2, start, a, scale1, scale2`` (``None`` for an absent chain)."""
    state = setup.state
    gx, sums = setup.impl.ltq_backward(x, grad, setup.chain, scale1.detach(), scale2.detach(), state.thresholds,
                                       state.levels, state.breakpoints, state.slope)
    grads = _param_grads(sums.gste, state, a, eps, scale2)
    g_chain = (None, None, None)
    if b1 is not None:
        g_chain = tuple(grad_like(g, p) for g, p in zip(sums.chain, (b1, w, b2)))
    params = tuple(grad_like(g, p) for g, p in zip(grads, (start, a, scale1, scale2)))
    return (as_layout_of(gx.to(x.dtype), x), *g_chain, *params)


def _param_grads(sums, state: LTQState, a, eps, scale2):
    """G-STE's one formula, :func:`n2uq.quant.gste_param_grads`, on the sums as the kernels return them.

    NumPy sums (the CPU kernels) go in with the NumPy parameters the forward's state kept; if the
    formula has been edited with operations only tensors have, it gets the same values as tensors
    instead (slower, same result)."""
    if isinstance(sums.grad, torch.Tensor):
        return definitions.gste_param_grads(sums, state.a_pos, a, eps, scale2)
    host = state.host or [p.detach().numpy() for p in (state.a_pos, a, eps, scale2)]
    try:
        return definitions.gste_param_grads(sums, *host)
    except (TypeError, AttributeError):
        as_tensors = type(sums)(*(torch.as_tensor(v) for v in sums))
        return definitions.gste_param_grads(as_tensors, state.a_pos, a, eps, scale2)


class _Stage(torch.autograd.Function):
    """Eager form of ``n2uq::ltq_stage``: the LTQ state computed in forward is reused in backward.

    The backward is differentiable once: a gradient taken with ``create_graph=True`` raises when it is
    differentiated again (the kernels' gradients carry no graph); ``N2UQ_KERNELS=reference`` runs the
    definition, whose backward is made of differentiable tensor operations."""

    @staticmethod
    def forward(ctx, x, b1, w, b2, start, a, scale1, scale2, eps, levels, want_codes, out_code):  # type: ignore[override]
        setup = _setup(x, b1, w, b2, start, a, scale1, scale2, eps, levels)
        y, codes, table = _forward(x, scale1, setup, want_codes, out_code)
        ctx.save_for_backward(x, b1, w, b2, start, a, scale1, scale2, eps)
        ctx.setup = setup
        ctx.mark_non_differentiable(*[t for t in (codes, table) if t is not None])
        return y, codes, table

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_codes, _grad_table):  # type: ignore[override]
        x, b1, w, b2, start, a, scale1, scale2, eps = ctx.saved_tensors
        return (*_backward(grad, x, b1, w, b2, start, a, scale1, scale2, eps, ctx.setup), None, None, None, None)


@torch.library.custom_op("n2uq::ltq_stage", mutates_args=())
def _ltq_stage_op(x: Tensor, b1: Optional[Tensor], w: Optional[Tensor], b2: Optional[Tensor], start: Tensor,
                  a: Tensor, scale1: Tensor, scale2: Tensor, eps: Tensor, levels: Tensor,
                  want_codes: bool, out_code: int) -> Tuple[Tensor, Tensor, Tensor]:
    setup = _setup(x, b1, w, b2, start, a, scale1, scale2, eps, levels)
    y, codes, table = _forward(x, scale1, setup, want_codes, out_code)
    return y, (x.new_empty(EMPTY, dtype=torch.uint8) if codes is None else codes), table


@_ltq_stage_op.register_fake
def _(x, b1, w, b2, start, a, scale1, scale2, eps, levels, want_codes, out_code):
    dtype = compute_dtype(x, scale1, b1, w, b2)
    codes = torch.empty_like(x, dtype=torch.uint8) if want_codes else x.new_empty(EMPTY, dtype=torch.uint8)
    y = torch.empty_like(x, dtype=_OUT_DTYPES[out_code] or dtype)
    return y, codes, levels.new_empty(levels.shape, dtype=dtype)


@torch.library.custom_op("n2uq::ltq_stage_backward", mutates_args=())
def _ltq_stage_backward_op(grad: Tensor, x: Tensor, b1: Optional[Tensor], w: Optional[Tensor],
                           b2: Optional[Tensor], start: Tensor, a: Tensor, scale1: Tensor, scale2: Tensor,
                           eps: Tensor, levels: Tensor
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    setup = _setup(x, b1, w, b2, start, a, scale1, scale2, eps, levels)
    grads = _backward(grad, x, b1, w, b2, start, a, scale1, scale2, eps, setup)
    return tuple(x.new_empty(EMPTY) if g is None else g for g in grads)


@_ltq_stage_backward_op.register_fake
def _(grad, x, b1, w, b2, start, a, scale1, scale2, eps, levels):
    chain = tuple(x.new_empty(EMPTY) if p is None else torch.empty_like(p) for p in (b1, w, b2))
    return (torch.empty_like(x), *chain, *(torch.empty_like(p) for p in (start, a, scale1, scale2)))


def _stage_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10])
    ctx.grad_dtype = compute_dtype(*inputs[:1], inputs[6], *inputs[1:4])


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
