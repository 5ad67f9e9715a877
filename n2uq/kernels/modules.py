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
* :class:`PACT` — one autograd function with the definition's forward operations and a closed-form
  backward, keeping only the input (autograd of the definition keeps three input-sized tensors).

Under ``N2UQ_KERNELS=reference`` they run the definitions' ``forward``, so an edited definition
is what a network built from them trains with. A subclass that overrides ``forward`` (or, for the
convolution, ``scale`` / ``quantized_weight``) runs its own code, as with the definitions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from n2uq import quant as definitions
from n2uq.kernels import select
from n2uq.kernels.block_ops import weight_ste
from n2uq.kernels.ltq_op import ltq_stage
from n2uq.numerics import conv2d

__all__ = ["LTQ", "HardQuantizeConv", "PACT"]


class LTQ(definitions.LTQ):
    __doc__ = (definitions.LTQ.__doc__ or "") + """
    This is ``n2uq.LTQ``: the forward runs the fused operator (``n2uq.kernels.ltq_op``) unless
    ``N2UQ_KERNELS=reference``, which runs :class:`n2uq.quant.LTQFunction`.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not select.fused():
            return super().forward(x)
        if x.dim() == 0:  # the definition's x·scale1 broadcasts a 0-d input to shape [1]
            x = x.reshape(1)
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


class PACT(definitions.PACT):
    __doc__ = (definitions.PACT.__doc__ or "") + """
    This is ``n2uq.PACT``: forward and backward in one autograd function (:class:`_PACTFunction`)
    unless ``N2UQ_KERNELS=reference``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not select.fused():
            return super().forward(x)
        return _PACTFunction.apply(x, self.clip_val, self.n_bit)


class _PACTFunction(torch.autograd.Function):
    """:meth:`n2uq.quant.PACT.forward` with its gradients in closed form; saves ``x`` only.

    ``r = relu(x)``, ``x_c = r if r < c else c``, ``u = x_c·n_q`` (``n_q = (2^b-1)/c``):
    ``∂/∂x = grad·[0 < r < c]``; ``∂/∂c = Σ grad·[not r < c] + Σ grad·round(u)/(2^b-1)`` (the
    ``1/n_q`` factor), evaluated as autograd does: ``-(Σ grad·round(u))/n_q² · (2^b-1) · -(1/c)²``.
    """

    @staticmethod
    def forward(ctx, x, clip_val, n_bit):  # type: ignore[override]
        r = torch.relu(x)
        x_c = torch.where(r < clip_val, r, clip_val)
        steps = (2**n_bit - 1) / clip_val
        ctx.save_for_backward(x, clip_val)
        ctx.n_bit = n_bit
        return torch.round(x_c * steps) / steps + x_c - x_c  # the definition's operations, in its order

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, clip_val = ctx.saved_tensors
        r = torch.relu(x)
        below = r < clip_val
        grad_x = torch.where(below & (r > 0), grad, 0.0)
        x_c = torch.where(below, r, clip_val)
        n = 2**ctx.n_bit - 1
        steps = n / clip_val
        rounded_sum = (grad * torch.round(x_c * steps)).sum()
        grad_c = torch.where(below, 0.0, grad).sum() + (-rounded_sum / (steps * steps)) * n * -(1 / clip_val) ** 2
        return grad_x, grad_c.reshape(clip_val.shape).to(clip_val.dtype), None
