"""The specification's literal forms of the N2UQ quantizers (``spec_*``), written from SPEC §1-§3.

Slow and obviously correct: they follow the specification line by line (a loop over thresholds
with ``torch.where``, the straight-through trick done with ``detach``) and let autograd derive
every gradient. The definitions in :mod:`n2uq.quant` are checked against them
(tests/test_quant.py). Not to be confused with the authors' released code or with the
``N2UQ_KERNELS=reference`` backend (which runs the definitions module by module).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def spec_ltq(x: Tensor, start: Tensor, a: Tensor, scale1: Tensor, scale2: Tensor,
                  eps: float = 1e-3) -> Tensor:
    """SPEC §1: forward levels ``L[m]·scale2``, gradient of ``scale2·g(scale1·x)``.

    Returns a tensor whose value is exactly the level ``L[m]·scale2`` (the G-STE surrogate ``g``
    is attached through ``g - g.detach()``, which is 0 in value) and whose gradient w.r.t. ``x``,
    ``start``, ``a``, ``scale1`` is that of ``scale2·g`` and w.r.t. ``scale2`` is ``L[m]``.
    """
    n = a.numel()
    interval = 2.0 / n
    eps_t = torch.tensor([eps], dtype=a.dtype)
    xs = x * scale1
    a_pos = torch.where(a > eps_t, a, eps_t)

    # Forward: thresholds and levels accumulated one term at a time.
    level = torch.zeros(1, dtype=x.dtype)
    forward_value = torch.zeros_like(xs)
    threshold = None
    for i in range(n):
        level = level + interval
        if i == 0:
            threshold = start + a_pos[0] / 2
        else:
            threshold = threshold + (a_pos[i - 1] / 2 + a_pos[i] / 2)
        forward_value = torch.where(xs.detach() > threshold.detach(), level, forward_value)

    g = spec_ltq_surrogate(x, start, a, scale1, eps)

    out = forward_value.detach() * scale2 + (g - g.detach()) * scale2.detach()
    # ∂/∂scale2 must be L[m]: the first term carries it; the second carries ∂/∂(x, start, a, scale1).
    return out


def spec_ltq_surrogate(x: Tensor, start: Tensor, a: Tensor, scale1: Tensor, eps: float = 1e-3) -> Tensor:
    """The G-STE surrogate ``g(scale1·x)`` of SPEC §1: piecewise linear over the breakpoints ``d[k]``.

    ``g = 0`` for ``xs <= d[0]``; ``interval/a⁺[k-1]·(xs - d[k-1]) + (k-1)·interval`` on
    ``(d[k-1], d[k]]``; the constant 2 above ``d[n]``. Differentiable in every argument.
    """
    n = a.numel()
    interval = 2.0 / n
    xs = x * scale1
    a_pos = torch.where(a > eps, a, torch.full_like(a, eps))
    g = torch.zeros_like(xs)
    d_prev = start
    for k in range(1, n + 1):
        d_next = d_prev + a_pos[k - 1]
        piece = interval / a_pos[k - 1] * (xs - d_prev) + (k - 1) * interval
        g = torch.where((xs > d_prev) & (xs <= d_next), piece, g)
        d_prev = d_next
    return torch.where(xs > d_prev, torch.full_like(xs, 2.0), g)


def spec_ltq_levels(n: int) -> Tensor:
    level = torch.zeros(1)
    out = [level]
    for _ in range(n):
        level = level + 2.0 / n
        out.append(level)
    return torch.cat(out)


def spec_weight_quant(weight: Tensor, n_bit: int, clip_val: float = 2.0) -> Tensor:
    """SPEC §2: value Wq, gradient dW_ste/dW = 1/s (no clipping mask)."""
    gamma = (2**n_bit - 1) / 2 ** (n_bit - 1)
    s = (gamma * weight.abs().mean(dim=(1, 2, 3), keepdim=True)).detach()
    ws = weight / s
    c = torch.tensor([clip_val], dtype=weight.dtype)
    wc = torch.where(ws < c / 2, ws, c / 2)
    wc = torch.where(wc > -c / 2, wc, -c / 2)
    nw = (2**n_bit - 1) / c
    wq = s * (torch.round((wc + c / 2) * nw) / nw - c / 2)
    return (wq.detach() - ws.detach()) + ws


def spec_quant_conv(x: Tensor, weight: Tensor, n_bit: int, stride: int, padding: int,
                         groups: int = 1) -> Tensor:
    return F.conv2d(x, spec_weight_quant(weight, n_bit), None, stride, padding, 1, groups)


def spec_pact(x: Tensor, clip_val: Tensor, n_bit: int) -> Tensor:
    """SPEC §3, literally."""
    x = torch.relu(x)
    x = torch.where(x < clip_val, x, clip_val)
    nq = (2**n_bit - 1) / clip_val
    return torch.round(x * nq) / nq + x - x.detach()
