"""The numbers of the fast (QDQ) export: 8-bit conv outputs and the comparisons that give the codes.

The fast ONNX form (:mod:`n2uq.export.fast_onnx`) runs every quantized convolution as an 8-bit
convolution (onnxruntime fuses ``DequantizeLinear → Conv → QuantizeLinear`` into ``QLinearConv``),
so a convolution's output leaves it as an 8-bit value ``q = sat(round(a·(acc + B)))`` per channel
(``a > 0`` from the weight scale, ``B`` the int32 bias).

* **A quantizer after a quantized conv** (the paper's activation quantizer ``m = #{i : x·scale1 >
  t[i]}``, docs/SPEC.md, streamlined to ``m = #{j : d·acc >= T[j]}`` with integer ``T``): with
  ``a = 1`` the output is the accumulator itself, shifted, so each ``d·acc >= T[j]`` is an exact
  comparison of ``q`` with a level; a channel whose thresholds lie further apart than one 8-bit
  window (255 accumulator values) gets more output windows (copies of the channel with other
  shifts). :func:`accumulator_plan`.
* **A conv whose value is used as a float** (the BN output feeding the residual addition, or a
  ReLU6): ``acc·α + β`` is quantized to 8 bits over a per-channel range calibrated on images
  (:func:`output_plan`, :func:`calibrate_ranges`) — the one requantization the exact export does
  not make (the fast export can also keep these convs in float32, exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from n2uq.export.integer_model import IntegerModel
from n2uq.export.integer_ops import Dequant, Threshold

__all__ = ["WINDOW", "MAX_WINDOWS", "AccumulatorPlan", "OutputPlan", "accumulator_plan",
           "output_plan", "calibrate_ranges"]

#: Accumulator values one 8-bit window resolves (levels 1..255; level 0 is everything below).
WINDOW = 255
#: Most windows (conv output copies) a channel gets; a unit needing more runs its conv in float32.
MAX_WINDOWS = 4
INT32_MAX = 2**31 - 1


@dataclass
class AccumulatorPlan:
    """Windows ``i`` (8-bit outputs ``q = sat(round(a·(d·acc + B)))`` of conv channel
    ``channel_of[i]``; windows ``0..C−1`` are the channels' first, in channel order) and the
    comparisons: ``code[c] = base[c] + Σ_k [q[window_k[c]] >= level_k[c]]`` over ``slots``
    (``window_k = W``, one past the last window, names a constant-zero window)."""

    channel_of: Tensor  # [W] int64
    scale: Tensor  # a [W] float64, > 0
    bias: Tensor  # B [W] int64
    slots: List[Tuple[Tensor, Tensor]]  # per comparison slot: window [C] int64, level [C] uint8
    base: Tensor  # [C] uint8, thresholds that always count


@dataclass
class OutputPlan:
    """8-bit output of a conv whose value ``acc·α + β`` is needed as a float."""

    weight_sign: Tensor  # [C] ±1 (the weight codes are negated where α < 0)
    weight_scale: Tensor  # |α|/half [C] float64
    bias: Tensor  # round((β − centre)/|α|) [C] int64, in accumulator units
    half: Tensor  # [C] float64, half the range: the dequantization scale is half/127
    centre: Tensor  # [C] float64, added after dequantizing


def _windows(positions: List[int]) -> List[int]:
    """Greedy cover of sorted integer positions by windows ``[L, L + WINDOW − 1]``; their ``L``."""
    starts: List[int] = []
    for p in positions:
        if not starts or p > starts[-1] + WINDOW - 1:
            starts.append(p)
    return starts


def accumulator_plan(unit: Threshold, bound: int) -> Optional[AccumulatorPlan]:
    """8-bit conv outputs (windows) and level comparisons that give a streamlined unit's codes
    ``m = #{j : d·acc >= T[j]}`` from an integer accumulator ``|acc| <= bound``.

    Window ``i`` is conv channel ``channel_of[i]`` with its weight codes times ``d`` and
    ``q = sat(d·acc + B)`` (``a = 1``, ``B = 1 − L``): level ``k`` is ``d·acc = L − 1 + k``, so
    ``d·acc >= p  ⇔  q >= p − L + 1`` exactly for every ``p`` in ``[L, L + 254]``. A channel whose
    thresholds do not fit one window gets more; ``None`` when some channel would need more than
    :data:`MAX_WINDOWS` (the conv then runs in float32). Thresholds ``< −bound`` always count
    (``base``), ``> bound`` never."""
    if bool(unit.fallback.any()):
        raise ValueError(f"{unit.name}: an accumulator unit with fallback channels has no 8-bit plan")
    t = unit.thresholds.double()
    c_count = t.shape[0]
    base = (t < -bound).sum(1).to(torch.uint8)
    primary: List[tuple] = []
    extra: List[tuple] = []  # (channel, L, a)
    per_channel: List[List[tuple]] = []  # (window index, level) per counted threshold
    for ch in range(c_count):
        pos = sorted(int(v) for v in t[ch].tolist() if -bound <= v <= bound)
        starts = _windows(pos) or [0]
        if len(starts) > MAX_WINDOWS:
            return None
        index = [ch] + [c_count + len(extra) + k for k in range(len(starts) - 1)]
        primary.append((ch, starts[0], 1.0))
        extra += [(ch, start, 1.0) for start in starts[1:]]
        comps = []
        for p in pos:
            w = max(k for k, start in enumerate(starts) if start <= p)
            comps.append((index[w], p - starts[w] + 1))
        per_channel.append(comps)
    windows = primary + extra
    zero = len(windows)
    n_slots = max((len(cmp) for cmp in per_channel), default=0)
    slots = []
    for k in range(n_slots):
        pick = [cmp[k] if k < len(cmp) else (zero, 1) for cmp in per_channel]
        slots.append((torch.tensor([w for w, _ in pick]), torch.tensor([lv for _, lv in pick], dtype=torch.uint8)))
    scale = torch.tensor([w[2] for w in windows], dtype=torch.float64)
    # q = round(a·(d·acc + B)): level 1 <-> d·acc = L (B = 1/a − L)
    bias = torch.tensor([round(1.0 / w[2] - w[1]) for w in windows], dtype=torch.int64)
    return AccumulatorPlan(torch.tensor([w[0] for w in windows]), scale, bias, slots, base)


def output_plan(op: Dequant, low: Tensor, high: Tensor) -> OutputPlan:
    """8-bit output of the conv whose value is ``acc·α + β`` (``op``) over ``[low, high]`` per channel:
    ``q − 128 = round((value − centre)/half · 127)``."""
    alpha, beta = op.alpha.double(), op.beta.double()
    mag = alpha.abs().clamp(min=1e-30)
    centre = (low.double() + high.double()) / 2
    half = ((high.double() - low.double()) / 2).clamp(min=1e-12)
    bias = torch.round((beta - centre) / mag).clamp(-INT32_MAX // 2, INT32_MAX // 2).to(torch.int64)
    return OutputPlan(torch.where(alpha < 0, -1, 1).to(torch.int8), mag / half, bias, half, centre)


@torch.no_grad()
def calibrate_ranges(int_model: IntegerModel, images: Tensor,
                     margin: float = 1.0) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Per :class:`Dequant` op the per-channel ``(low, high)`` of ``acc·α + β`` over ``images``, widened
    about its centre by ``margin``."""
    seen: Dict[str, Tuple[Tensor, Tensor]] = {}
    hooks = []
    for op in int_model.ops:
        if isinstance(op, Dequant):
            def hook(module, _inputs, out, key=op.name):
                flat = out.detach().transpose(0, 1).reshape(out.shape[1], -1).double()
                low, high = flat.amin(1), flat.amax(1)
                if key in seen:
                    low, high = torch.minimum(seen[key][0], low), torch.maximum(seen[key][1], high)
                seen[key] = (low, high)
            hooks.append(op.register_forward_hook(hook))
    try:
        int_model(images)
    finally:
        for h in hooks:
            h.remove()
    widen = lambda lo, hi: ((lo + hi) / 2 - (hi - lo) / 2 * margin, (lo + hi) / 2 + (hi - lo) / 2 * margin)
    return {k: widen(*v) for k, v in seen.items()}
