"""The N2UQ operators in plain PyTorch, with the interface of the C and Triton kernels.

Used with ``N2UQ_KERNELS=torch``, and by ``auto`` wherever no kernel applies (bfloat16 on CPU,
CUDA without Triton, LTQ wider than the kernels take). Compared with the definitions in
:mod:`n2uq.quant`, the LTQ backward is in closed form (one pass over the input, per-interval sums
by ``index_add_``, instead of one pass per interval) and the RPReLU chain runs in the same call;
the values are the same (``tests/test_backends.py``).

The interface, shared with :mod:`n2uq.kernels.cpu` and :mod:`n2uq.kernels.triton_ops`; ``chain``
is ``(bias1, prelu_weight, bias2)`` as ``[C]`` vectors of the compute dtype, or ``None`` for a
plain LTQ:

* ``ltq_forward(x, chain, scale1, thresholds, table, want_codes, out_dtype) -> (y, uint8 codes)``
* ``ltq_backward(x, grad, chain, scale1, scale2, thresholds, levels, breakpoints, slope)
  -> (input gradient, LTQSums)`` — :class:`~n2uq.kernels.op_utils.LTQSums`: G-STE's float64 sums
  (:class:`n2uq.quant.GSTESums`; for inner interval k, ``d[k-1] < xs <= d[k]``, ``G_k = Σ grad`` and
  ``Q_k = Σ grad·(xs - d[k-1])``; ``Σ ∂L/∂xs · z`` with z the LTQ input; ``Σ grad·L[m]``) and the
  chain's per-channel sums. The parameter gradients are not computed here:
  :func:`n2uq.quant.gste_param_grads` makes them from these sums.
* ``rprelu_forward(x, residual, chain, want_z) -> (y, z)``,
  ``rprelu_backward(grad, z, w) -> (input gradient, ChainSums)``
* ``decode(codes, table)``

Channels_last (or any densely permuted) inputs are processed through their contiguous permuted
view, so ``torch.bucketize`` copies nothing and results keep the input's layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from n2uq.kernels.layout import memory_order
from n2uq.kernels.op_utils import ChainSums, LTQSums
from n2uq.quant import GSTESums

__all__ = ["ltq_forward", "ltq_backward", "rprelu_forward", "rprelu_backward", "decode", "codes_of", "lookup"]


def _bucketize(xs: Tensor, boundaries: Tensor) -> Tensor:
    """``torch.bucketize(xs, boundaries)`` (number of boundaries strictly below) in the layout of ``xs``."""
    order = memory_order(xs)
    if order is None:
        return torch.bucketize(xs.contiguous(), boundaries, right=False)
    perm, inverse = order
    return torch.bucketize(xs.permute(perm), boundaries, right=False).permute(inverse)


def codes_of(xs: Tensor, thresholds: Tensor) -> Tensor:
    """LTQ code ``m = #{i : xs > T[i]}`` as :func:`n2uq.quant.ltq_codes`, in one search per element.

    ``bucketize`` counts the thresholds strictly below a value, which is ``m`` because they are
    non-decreasing; it ranks NaN above everything, where the definition gives 0, hence the fix-up.
    """
    codes = _bucketize(xs, thresholds.to(xs.dtype))
    return codes.masked_fill_(torch.isnan(xs), 0)


def lookup(table: Tensor, codes: Tensor) -> Tensor:
    """``table[codes]`` with the memory layout of ``codes`` (plain indexing returns contiguous)."""
    order = memory_order(codes)
    if order is None:
        return table[codes]
    perm, inverse = order
    return table[codes.permute(perm)].permute(inverse)


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


def _chain(x: Tensor, chain) -> Tensor:
    """``b2 + prelu(x + b1, w)``: the RPReLU modules' operations, in their order."""
    if chain is None:
        return x
    b1, w, b2 = chain
    return F.prelu(x + _per_channel(b1, x), w) + _per_channel(b2, x)


def _channel_sums(t: Tensor) -> Tensor:
    """Float64 sums over every dimension but 1 (the channel)."""
    return t.sum(dim=[d for d in range(t.dim()) if d != 1], dtype=torch.float64)


def _prelu_backward(grad: Tensor, z: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """PReLU's backward at input ``z``: ``(grad of z, float64 per-channel grad of w)``."""
    positive = z > 0
    g_w = _channel_sums(torch.where(positive, torch.zeros_like(grad), z * grad))
    return torch.where(positive, grad, _per_channel(w, z) * grad), g_w


def ltq_forward(x: Tensor, chain, scale1: Tensor, thresholds: Tensor, table: Tensor, want_codes: bool,
                out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Optional[Tensor]]:
    with torch.no_grad():
        codes = codes_of(_chain(x, chain) * scale1, thresholds)
        y = lookup(table, codes)
        return (y if out_dtype is None else y.to(out_dtype)), (codes.to(torch.uint8) if want_codes else None)


def ltq_backward(x: Tensor, grad: Tensor, chain, scale1: Tensor, scale2: Tensor, thresholds: Tensor,
                 levels: Tensor, breakpoints: Tensor, slope: Tensor) -> tuple[Tensor, LTQSums]:
    with torch.no_grad():
        order = memory_order(x)  # flatten every tensor in x's memory order (a view when it has x's layout)
        flat = (lambda t: t.permute(order[0]).reshape(-1)) if order is not None else (lambda t: t.reshape(-1))
        n = thresholds.numel()
        z1 = x + _per_channel(chain[0], x) if chain is not None else x
        z2 = F.prelu(z1, chain[1]) + _per_channel(chain[2], x) if chain is not None else x
        xs = z2 * scale1
        # Interval index: 0 below d[0], k in 1..n for d[k-1] < xs <= d[k], n+1 above d[n] (and NaN).
        segment = _bucketize(xs, breakpoints)
        inside = (segment >= 1) & (segment <= n)
        seg0 = (segment - 1).clamp_(0, n - 1)
        grad_xs = torch.where(inside, (grad * scale2) * lookup(slope, seg0), grad.new_zeros(()))
        flat_seg, flat_grad = flat(segment), flat(grad)
        offset = flat(xs - lookup(breakpoints, seg0))
        sum_g = flat_grad.new_zeros(n + 2).index_add_(0, flat_seg, flat_grad)[1 : n + 1]
        sum_q = flat_grad.new_zeros(n + 2).index_add_(0, flat_seg, flat_grad * offset)[1 : n + 1]
        s1 = (grad_xs * z2).sum()
        s2 = (grad * lookup(levels, codes_of(xs, thresholds))).sum()
        gste = GSTESums(sum_g.double(), sum_q.double(), s1.double(), s2.double())
        gx = grad_xs * scale1
        if chain is None:
            return gx, LTQSums(gste, None)
        g_b2 = _channel_sums(gx)  # back through b2 + prelu(z1, w), z1 = x + b1
        gx, g_w = _prelu_backward(gx, z1, chain[1])
        return gx, LTQSums(gste, ChainSums(_channel_sums(gx), g_w, g_b2))


def rprelu_forward(x: Tensor, residual: Optional[Tensor], chain,
                   want_z: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    with torch.no_grad():
        b1, w, b2 = chain
        v = x if residual is None else x + residual
        z = v + _per_channel(b1, v)
        return F.prelu(z, w) + _per_channel(b2, z), (z if want_z else None)


def rprelu_backward(grad: Tensor, z: Tensor, w: Tensor) -> tuple[Tensor, ChainSums]:
    """Input gradient and the float64 per-channel sums of the parameters' gradients, named."""
    with torch.no_grad():
        gx, g_w = _prelu_backward(grad, z, w)
        return gx.to(z.dtype), ChainSums(bias1=_channel_sums(gx), weight=g_w, bias2=_channel_sums(grad))


def decode(codes: Tensor, table: Tensor) -> Tensor:
    return lookup(table, codes.long())
