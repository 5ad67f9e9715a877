"""Integer inference model of a trained N2UQ network (paper Fig. 1b): the public names in one place.

:func:`convert` lowers the float graph of :mod:`n2uq.export.graph` into a list of ops run by
:class:`IntegerModel`:

* every ``LTQ`` (with the RPReLU in front of it) and the ``PACT`` become a :class:`Threshold` that
  outputs the integer code ``m`` (the paper's activation quantizer, ``m = #{i : x·scale1 > t[i]}``);
  the uniform output step ``interval·scale2`` (PACT: ``c/n``) is not applied but folded downstream;
* every ``HardQuantizeConv`` becomes an :class:`IntConv` over activation codes ``m ∈ 0..2^b-1`` and
  odd weight codes ``k ∈ [-(2^b-1), 2^b-1]`` (the paper's weight quantizer). Its accumulator
  ``Σ m·k`` is an integer with ``|acc| <= bound = K·n_a·n_w`` (``K`` = inputs per output); it is
  computed exactly in float32 when ``bound < 2^24`` (every partial sum is then an integer that
  float32 represents, so no addition rounds, in any order) and in float64 otherwise (exact to
  ``2^53``);
* the accumulator's meaning, ``acc·α + β`` per output channel with ``α = step_a · s/n · γ/σ`` and
  ``β`` from the BatchNorm that follows (eval statistics), is kept symbolic: a following quantizer
  folds it into per-channel integer thresholds (:mod:`n2uq.export.streamline`), and only a float
  consumer (residual add, ReLU6 → pool) gets a :class:`Dequant`;
* the first conv, the FP downsample, BN on float tensors, residual additions, the block-output
  RPReLU, pooling and ``fc`` stay float, computed with the same ops as the fake-quant model.

The formulas are written out in docs/SPEC.md (activation quantizer, weight quantizer, PACT,
architectures). Where each part lives:

* :mod:`n2uq.export.ops` — the :class:`Op` protocol and the float ops;
* :mod:`n2uq.export.integer_ops` — :class:`Threshold`, :class:`IntConv`, :class:`Dequant`;
* :mod:`n2uq.export.integer_model` — :class:`IntegerModel`, :class:`UnitRecord`, :data:`OP_TYPES`;
* :mod:`n2uq.export.lowering` — :func:`convert`.
"""

from __future__ import annotations

from n2uq.export.integer_model import OP_TYPES, IntegerModel, UnitRecord
from n2uq.export.integer_ops import EXACT_FLOAT32_BOUND, Dequant, FallbackChain, IntConv, Threshold, UnitKind
from n2uq.export.lowering import convert
from n2uq.export.ops import (
    Add,
    BatchNorm,
    ConvGeometry,
    Flatten,
    FloatConv,
    GlobalAvgPool,
    Linear,
    MaxPool,
    Op,
    Relu,
    Relu6,
    RPReLU,
)

__all__ = [
    "convert", "IntegerModel", "UnitRecord", "OP_TYPES", "EXACT_FLOAT32_BOUND",
    "Op", "ConvGeometry", "FloatConv", "BatchNorm", "Relu", "Relu6", "MaxPool", "GlobalAvgPool", "Flatten",
    "Linear", "Add", "RPReLU",
    "Threshold", "UnitKind", "FallbackChain", "IntConv", "Dequant",
]
