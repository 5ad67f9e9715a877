"""Per-channel thresholds that replace a quantizer's float chain (the FINN "streamlined
MultiThreshold" form).

A quantizer unit turns its input ``x`` into a code ``m`` in ``0..n``. When, for channel ``c``,
the whole chain from ``x`` to ``m`` is monotone, ``m`` is a count of thresholds::

    m = #{ j : d_c · x >= T[c, j] }          d_c ∈ {+1, -1},  T[c, :] non-decreasing

(``>=`` as in qonnx's ``MultiThreshold``). ``T[c, j]`` is the smallest ``u`` whose code is at least
``j``; it is found by bisection over the values ``u`` can take, so the count reproduces the chain
exactly on those values:

* accumulator inputs (integers ``|acc| <= bound``): bisection over the integers, the chain
  ``affine → RPReLU → LTQ`` (or ``affine → PACT``) evaluated in float64 — the exact-arithmetic
  value of the integer model, which the float32 fake-quant model approximates;
* float inputs (block inputs, float32): bisection over the float32 values themselves (ordered by
  their bit patterns), the chain evaluated with the very float32 ops of the fake-quant model — so
  the thresholds give bit-identical codes for every float32 input.

Monotone means the PReLU slope is ``>= 0`` (then every float op of the chain is non-decreasing,
rounding included) and the direction is the sign of ``affine scale · scale1``. A channel with a
negative PReLU slope is V-shaped and keeps the float chain (the fallback).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rprelu_ltq_chain", "ltq_count", "pact_code", "float_thresholds", "integer_thresholds",
           "float32_from_key", "FLOAT32_INF_KEY"]

#: Ordered key of float32 +inf (its bit pattern); -inf is ``-FLOAT32_INF_KEY - 1``.
FLOAT32_INF_KEY = 0x7F800000


def rprelu_ltq_chain(v: Tensor, b1: Optional[Tensor], w: Optional[Tensor], b2: Optional[Tensor],
                     scale1: Tensor) -> Tensor:
    """``scale1 · (prelu(v + b1, w) + b2)`` with the fake-quant model's float ops and order
    (``LearnableBias → PReLU → LearnableBias``, then the LTQ's ``x · scale1``). ``v``'s dim 1 is
    the channel; ``b1``/``b2`` broadcast against ``v``; ``w`` has one entry per channel (or one)."""
    if b1 is not None:
        v = v + b1
    if w is not None:
        v = F.prelu(v, w)
    if b2 is not None:
        v = v + b2
    return v * scale1


def ltq_count(xs: Tensor, thresholds: Tensor) -> Tensor:
    """``#{i : xs > t[i]}`` (strict, as in the paper's activation quantizer) for any shape of ``xs``."""
    return torch.bucketize(xs, thresholds.to(xs.dtype), right=False)


def pact_code(v: Tensor, clip_val: Tensor, n: int) -> Tensor:
    """PACT's code ``round(clip(relu(v), c) · n/c)`` (docs/SPEC.md, PACT), round half to even like torch."""
    v = torch.relu(v)
    v = torch.where(v < clip_val, v, clip_val)
    return torch.round(v * (n / clip_val))


def _lowest_reaching(code_fn: Callable[[Tensor], Tensor], lo: int, hi: int, channels: int, n: int,
                     to_value: Callable[[Tensor], Tensor]) -> Tensor:
    """For every channel ``c`` and level ``j = 1..n`` the smallest key ``k`` in ``[lo, hi)`` with
    ``code_fn(to_value(k))[c, j-1] >= j``, or ``hi`` when there is none.

    ``code_fn`` maps values of shape ``[1, C, n]`` (channel ``c`` in column ``c``) to codes and must be
    non-decreasing in the value for each channel; bisection then needs ``log2(hi - lo)`` steps.
    """
    target = torch.arange(1, n + 1, dtype=torch.int64).expand(channels, n)
    lo_t = torch.full((channels, n), lo, dtype=torch.int64)
    hi_t = torch.full((channels, n), hi, dtype=torch.int64)
    while bool((lo_t < hi_t).any()):
        mid = lo_t + (hi_t - lo_t) // 2
        reached = code_fn(to_value(mid).unsqueeze(0))[0].to(torch.int64) >= target
        hi_t = torch.where(reached, mid, hi_t)
        lo_t = torch.where(reached, lo_t, mid + 1)
    return lo_t


def float32_from_key(key: Tensor) -> Tensor:
    """Inverse of the order-preserving map float32 → integer key (``+0 → 0``, ``-0 → -1``)."""
    bits = torch.where(key >= 0, key, -key - 1 - 2**31)
    return bits.to(torch.int32).view(torch.float32)


def float_thresholds(code_fn: Callable[[Tensor], Tensor], channels: int, n: int) -> Tensor:
    """Thresholds ``T [C, n]`` (float32, ``±inf`` allowed) on float32 inputs: for every float32 ``u``,
    ``#{j : u >= T[c, j]} == code_fn(u)`` for channel ``c`` (exact, see the module doc)."""
    lo, hi = -FLOAT32_INF_KEY - 1, FLOAT32_INF_KEY + 1
    keys = _lowest_reaching(code_fn, lo, hi, channels, n, float32_from_key)
    return float32_from_key(keys.clamp(max=FLOAT32_INF_KEY))


def integer_thresholds(code_fn: Callable[[Tensor], Tensor], channels: int, n: int, bound: int) -> Tensor:
    """Integer thresholds ``T [C, n]`` in ``[-bound-1, bound+1]`` (int64): for every integer
    ``|u| <= bound``, ``#{j : u >= T[c, j]} == code_fn(u)`` for channel ``c``."""
    return _lowest_reaching(code_fn, -bound - 1, bound + 1, channels, n, lambda k: k.to(torch.float64))
