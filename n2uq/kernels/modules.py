"""The quantizer modules a user imports (``n2uq.LTQ``, ``n2uq.HardQuantizeConv``): the definitions'
modules running the fast operators.

Each class here is its definition in :mod:`n2uq.quant` — same constructor, same parameters and
buffers, hence the same state dict — with one ``forward`` that, under every backend but
``reference`` (:func:`n2uq.kernels.select.fused`), calls the fused operator that the models use:

* :class:`LTQ` — ``n2uq::ltq_stage`` without the RPReLU chain (C/OpenMP on CPU float32/float64,
  Triton on CUDA, plain PyTorch elsewhere): the same values as :class:`n2uq.quant.LTQFunction`
  (forward bit for bit, gradients to float rounding), keeping only the input for backward.
* :class:`HardQuantizeConv` — the weight through ``n2uq::weight_ste`` (one pass), then the
  convolution: values and gradients bit for bit those of the definition.

Under ``N2UQ_KERNELS=reference`` they run the definitions' ``forward``, so an edited definition
is what a network built from them trains with. A subclass that overrides ``forward`` (or, for the
convolution, ``scale`` / ``quantized_weight``) runs its own code, as with the definitions.
"""

from __future__ import annotations

from torch import Tensor

from n2uq import quant as definitions
from n2uq.kernels import select
from n2uq.kernels.block_ops import weight_ste
from n2uq.kernels.ltq_op import ltq_stage
from n2uq.numerics import conv2d

__all__ = ["LTQ", "HardQuantizeConv"]


class LTQ(definitions.LTQ):
    __doc__ = (definitions.LTQ.__doc__ or "") + """
    This is ``n2uq.LTQ``: the forward runs the fused operator (``n2uq.kernels.ltq_op``) unless
    ``N2UQ_KERNELS=reference``, which runs :class:`n2uq.quant.LTQFunction`.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not select.fused():
            return super().forward(x)
        return ltq_stage(x, None, None, None, self.start, self.a, self.scale1, self.scale2, self.eps,
                         self.levels)[0]


class HardQuantizeConv(definitions.HardQuantizeConv):
    __doc__ = (definitions.HardQuantizeConv.__doc__ or "") + """
    This is ``n2uq.HardQuantizeConv``: the quantized weight comes from the one-pass operator
    (``n2uq.kernels.block_ops.weight_ste``) unless ``N2UQ_KERNELS=reference``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not select.fused() or not weight_is_the_definitions(self):
            return super().forward(x)
        return conv2d(x, weight_ste(self.weight, self.clip_val, self.n_bit), self.stride, self.padding, self.groups)


def weight_is_the_definitions(conv: definitions.HardQuantizeConv) -> bool:
    """Whether ``conv`` quantizes its weight as :class:`n2uq.quant.HardQuantizeConv` does (a subclass
    such as :class:`~n2uq.quant.MaxAbsQuantizeConv` that changes ``scale`` does not)."""
    kind, base = type(conv), definitions.HardQuantizeConv
    return kind.scale is base.scale and kind.quantized_weight is base.quantized_weight
