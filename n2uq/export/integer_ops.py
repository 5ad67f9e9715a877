"""The integer steps of an integer model: quantizer units, integer convolutions, dequantization.

* :class:`Threshold` — an ``LTQ`` (with the RPReLU in front of it) or a ``PACT`` as a unit that
  outputs the integer code ``m`` (the paper's activation quantizer: ``m = #{i : x·scale1 > t[i]}``,
  see docs/SPEC.md, activation quantizer); the uniform output step is folded downstream.
* :class:`IntConv` — a ``HardQuantizeConv`` over activation codes and odd weight codes, whose
  integer accumulator is computed exactly (float32 below :data:`EXACT_FLOAT32_BOUND`, else float64).
* :class:`Dequant` — the accumulator's float value ``acc·α + β`` where a float op consumes it.

How a trained model becomes these ops is in :mod:`n2uq.export.lowering`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from n2uq.export.ops import ConvGeometry, Op, per_channel
from n2uq.export.streamline import rprelu_ltq_chain

__all__ = ["EXACT_FLOAT32_BOUND", "ACCUMULATOR_DTYPES", "INTEGER_OPS", "IntConv", "Dequant", "UnitKind",
           "FallbackChain", "Threshold"]

#: Integers up to this magnitude are exact in float32, and so is every sum of them that stays below.
EXACT_FLOAT32_BOUND = 2**24

#: The dtypes an integer accumulator is held in, by the name saved with the op.
ACCUMULATOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class IntConv(Op):
    """Convolution of activation codes by weight codes; returns the exact integer accumulator
    (held in ``dtype``: float32 when ``bound < 2^24``, else float64).

    A convolution that sums products (direct or GEMM, PyTorch's CPU paths) is exact here without
    help; the final ``round`` makes transform-based algorithms (Winograd, FFT: possible on GPUs)
    exact too, as long as their error stays below 1/2.
    """

    def __init__(self, name, inputs, output, weight: Tensor, geometry: ConvGeometry,
                 weight_bits: int = 2, bound: int = 0, dtype: str = "float32"):
        super().__init__(name, inputs, output)
        self.register_buffer("weight", weight)  # odd integer codes, int8 (int16 for 8 bits)
        self.stride, self.padding, self.groups = list(geometry.stride), list(geometry.padding), int(geometry.groups)
        self.weight_bits, self.bound, self.dtype = int(weight_bits), int(bound), dtype

    def attrs(self):
        return {"stride": self.stride, "padding": self.padding, "groups": self.groups,
                "weight_bits": self.weight_bits, "bound": self.bound, "dtype": self.dtype}

    @classmethod
    def from_saved(cls, name, inputs, output, attrs, tensors):
        geometry = ConvGeometry(attrs["stride"], attrs["padding"], groups=attrs["groups"])
        return cls(name, tuple(inputs), output, tensors["weight"], geometry, attrs["weight_bits"], attrs["bound"],
                   attrs["dtype"])

    def forward(self, codes: Tensor) -> Tensor:
        dt = ACCUMULATOR_DTYPES[self.dtype]
        return F.conv2d(codes.to(dt), self.weight.to(dt), None, self.stride, self.padding, 1, self.groups).round()


class Dequant(Op):
    """``acc·α + β`` per channel (the integer accumulator's float value, BN folded), in α's dtype."""

    def __init__(self, name, inputs, output, alpha: Tensor, beta: Tensor):
        super().__init__(name, inputs, output)
        self.register_buffer("alpha", alpha)
        self.register_buffer("beta", beta)

    def forward(self, acc: Tensor) -> Tensor:
        return acc.to(self.alpha.dtype) * per_channel(self.alpha) + per_channel(self.beta)


@dataclass(frozen=True)
class UnitKind:
    """What a :class:`Threshold` unit is: its bits, the value of one code step downstream
    (``interval·scale2``, or ``c/n`` for PACT), what it reads (``"float"``: a float tensor,
    ``"acc"``: an integer accumulator) and which quantizer it replaces (``"ltq"`` or ``"pact"``)."""

    bits: int = 2
    step: float = 1.0
    source: str = "float"
    quantizer: str = "ltq"


@dataclass
class FallbackChain:
    """The per-channel tensors of the float chain ``u = scale1·RPReLU(α·x + β)`` that a unit
    evaluates on its fallback channels (``None``: that part of the chain is absent)."""

    alpha: Optional[Tensor] = None
    beta: Optional[Tensor] = None
    bias1: Optional[Tensor] = None
    slope: Optional[Tensor] = None
    bias2: Optional[Tensor] = None
    scale1: Optional[Tensor] = None

    KEYS: ClassVar[Tuple[str, ...]] = ("alpha", "beta", "bias1", "slope", "bias2", "scale1")


class Threshold(Op):
    """Quantizer unit: input (float tensor or integer accumulator) → code ``m ∈ 0..2^b-1``.

    ``u = d·x`` on streamlined channels and ``u = scale1·RPReLU(α·x + β)`` (the float chain) on
    fallback channels; then ``m = #{j : u >= T[c, j]}`` (:mod:`n2uq.export.streamline`). On
    fallback channels ``T`` is ``nextafter(t, +inf)``, so ``>=`` is the LTQ's strict ``>``.
    """

    def __init__(self, name, inputs, output, thresholds: Tensor, direction: Tensor, fallback: Tensor,
                 kind: UnitKind, chain: Optional[FallbackChain]):
        super().__init__(name, inputs, output)
        self.register_buffer("thresholds", thresholds)  # [C, n], non-decreasing per row
        self.register_buffer("direction", direction)  # [C], ±1
        self.register_buffer("fallback", fallback)  # [C] bool
        chain = chain or FallbackChain()  # None: no fallback channel, no float chain
        for key in FallbackChain.KEYS:
            self.register_buffer(key, getattr(chain, key))
        self.bits, self.step = int(kind.bits), float(kind.step)
        self.source, self.quantizer = kind.source, kind.quantizer

    def attrs(self):
        return {"bits": self.bits, "step": self.step, "source": self.source, "quantizer": self.quantizer}

    @classmethod
    def from_saved(cls, name, inputs, output, attrs, tensors):
        chain = FallbackChain(**{key: tensors.get(key) for key in FallbackChain.KEYS})
        return cls(name, tuple(inputs), output, tensors["thresholds"], tensors["direction"], tensors["fallback"],
                   UnitKind(**attrs), chain)

    @property
    def streamlined_channels(self) -> int:
        return int((~self.fallback).sum())

    def chain(self, x: Tensor) -> Tensor:
        """The float chain (fallback channels), in the thresholds' dtype."""
        if self.alpha is not None:
            x = x * per_channel(self.alpha) + per_channel(self.beta)
        b1 = None if self.bias1 is None else per_channel(self.bias1)
        b2 = None if self.bias2 is None else per_channel(self.bias2)
        return rprelu_ltq_chain(x, b1, self.slope, b2, self.scale1)

    def preactivation(self, x: Tensor) -> Tensor:
        """``u``, the value compared with the thresholds."""
        x = x.to(self.thresholds.dtype)
        u = x * per_channel(self.direction.to(x.dtype))
        if bool(self.fallback.any()):
            u = torch.where(per_channel(self.fallback), self.chain(x), u)
        return u

    def count(self, u: Tensor) -> Tensor:
        """``#{j : u >= T[c, j]}`` as float32 codes."""
        c = u.shape[1]
        flat = u.transpose(0, 1).reshape(c, -1).contiguous()
        codes = torch.searchsorted(self.thresholds, flat, right=True)
        return codes.reshape(c, u.shape[0], *u.shape[2:]).transpose(0, 1).to(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        return self.count(self.preactivation(x))


#: The integer op types.
INTEGER_OPS = (IntConv, Dequant, Threshold)
