"""What each export format can hold, read off the float model before anything is converted or written.

* ``onnx`` (``ConvInteger``) and ``fast`` (``QLinearConv``) hold the weight codes as int8: odd codes
  ``k ∈ [-(2^b-1), 2^b-1]`` fit for ``b <= 7``;
* ``qonnx`` holds accumulators in float32 tensors, exact while ``|acc| <= bound = K·n_a·n_w < 2^24``
  (``K`` inputs per output, ``n_a = 2^a-1``, ``n_w = 2^b-1``; the bound :func:`n2uq.export.convert`
  computes, so the check here gives the answer conversion would);
* ``packed`` holds any width the models have (1..8 bits).
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from n2uq.export.integer_ops import EXACT_FLOAT32_BOUND
from n2uq.quant import HardQuantizeConv

__all__ = ["INT8_WEIGHT_BITS", "accumulator_bounds", "format_limits"]

#: Most weight bits whose odd codes fit int8 (|k| <= 127).
INT8_WEIGHT_BITS = 7


def _activation_levels(model: nn.Module) -> int:
    """Largest code ``n_a`` of the model's activation quantizers (LTQ, PACT: ``2^n_bit − 1``)."""
    bits = [m.n_bit for m in model.modules() if hasattr(m, "n_bit") and not isinstance(m, HardQuantizeConv)]
    return 2 ** max(bits, default=1) - 1


def accumulator_bounds(model: nn.Module) -> Dict[str, int]:
    """Per quantized conv (module name), the accumulator bound ``K·n_a·n_w`` of its integer form."""
    n_a = _activation_levels(model)
    return {name: (m.in_chn // m.groups) * m.kernel_size ** 2 * n_a * (2 ** m.n_bit - 1)
            for name, m in model.named_modules() if isinstance(m, HardQuantizeConv)}


def format_limits(model: nn.Module) -> Dict[str, Optional[str]]:
    """Per export format (``onnx``, ``fast``, ``qonnx``, ``packed``), why it cannot take ``model``, or
    ``None`` when it can."""
    convs = [m for m in model.modules() if isinstance(m, HardQuantizeConv)]
    weight_bits = max((m.n_bit for m in convs), default=0)
    int8 = None
    if weight_bits > INT8_WEIGHT_BITS:
        int8 = (f"its {weight_bits}-bit weight codes do not fit int8 (at most {INT8_WEIGHT_BITS} weight bits; "
                f"the packed format takes them)")
    qonnx = None
    bounds = accumulator_bounds(model)
    if bounds and max(bounds.values()) >= EXACT_FLOAT32_BOUND:
        name = max(bounds, key=bounds.get)
        qonnx = (f"accumulators up to {bounds[name]} ({name}) are not exact in QONNX's float32 tensors "
                 f"(limit 2^24; fewer bits, or another format)")
    return {"onnx": int8, "fast": int8, "qonnx": qonnx, "packed": None}
