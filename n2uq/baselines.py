"""The methods N2UQ is compared with in the paper's tables, as readable definitions.

* LSQ — Esser et al., *Learned Step Size Quantization*, ICLR 2020: :func:`lsq_quantize`,
  :class:`LSQActivation`, :class:`LSQConv`.
* PACT — Choi et al., *PACT: Parameterized Clipping Activation for Quantized Neural Networks*,
  2018: :func:`pact_quantize`, :class:`PACTActivation` (weights: DoReFa's, as in that paper).
* DoReFa-Net — Zhou et al., *DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with
  Low Bitwidth Gradients*, 2016: :func:`dorefa_weight`, :func:`dorefa_activation`,
  :class:`DoReFaActivation`, :class:`DoReFaConv`.

Plain PyTorch, each formula written as its paper states it; autograd derives every gradient from
these lines (straight-through rounding is ``x + (round(x) - x).detach()``). In a model they take
the place of :class:`~n2uq.quant.LTQ` (activations) and of the weight quantizer of
:class:`~n2uq.quant.HardQuantizeConv` (:mod:`n2uq.methods`); everything else stays the same.

``n2uq.PACT`` is a different thing: the authors' own PACT variant inside MobileNetV2 (its
gradient to the clip value also has a term from the rounding step, ``Σ grad·round(x·n/c)/n``, and
none below zero is passed to ``x`` at 0); :func:`pact_quantize` is the paper's.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from n2uq.bitwidth import check_bits
from n2uq.numerics import conv2d

__all__ = ["round_ste", "lsq_quantize", "pact_quantize", "dorefa_quantize_k", "dorefa_weight", "dorefa_activation",
           "LSQActivation", "LSQConv", "PACTActivation", "DoReFaActivation", "DoReFaConv"]


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in value, the identity in gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _scale_grad(t: Tensor, factor: float) -> Tensor:
    """``t`` in value, ``factor ×`` its gradient (LSQ's gradient scale)."""
    return (t - t * factor).detach() + t * factor


def lsq_bounds(n_bit: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: ``(2^(b-1), 2^(b-1) - 1)`` signed, ``(0, 2^b - 1)`` unsigned."""
    return (2 ** (n_bit - 1), 2 ** (n_bit - 1) - 1) if signed else (0, 2**n_bit - 1)


def lsq_quantize(x: Tensor, step: Tensor, n_bit: int, signed: bool, grad_scale: float) -> Tensor:
    """LSQ: ``x̂ = round(clamp(x/s, -Q_N, Q_P))·s``.

    Gradients (straight through the rounding): ``∂x̂/∂x = 1`` for ``-Q_N < x/s < Q_P``, else 0;
    ``∂x̂/∂s`` = ``-x/s + round(x/s)`` inside, ``-Q_N`` or ``Q_P`` at the clamps (the paper's eq. 3),
    multiplied by ``grad_scale`` (the paper uses ``1/sqrt(N·Q_P)``).
    """
    q_n, q_p = lsq_bounds(n_bit, signed)
    s = _scale_grad(step, grad_scale)
    v = x / s
    v = torch.where(v > -q_n, v, float(-q_n))  # clamp; no gradient at or beyond the bounds
    v = torch.where(v < q_p, v, float(q_p))
    return round_ste(v) * s


def pact_quantize(x: Tensor, alpha: Tensor, n_bit: int) -> Tensor:
    """PACT: ``y = clamp(x, 0, α)``, ``y_q = round(y·(2^b-1)/α)·α/(2^b-1)``.

    Straight through the rounding (``∂y_q/∂y = 1``): ``∂y_q/∂x = 1`` on ``[0, α)``, else 0;
    ``∂y_q/∂α = 1`` where ``x ≥ α``, else 0 (the paper's eq. 3).
    """
    y = torch.where(x < alpha, x, alpha)  # clip at α: α takes the gradient of the clipped elements
    y = torch.where(x < 0, torch.zeros_like(y), y)
    n = 2**n_bit - 1
    y_q = torch.round(y * n / alpha) * alpha / n
    return y + (y_q - y).detach()


def dorefa_quantize_k(r: Tensor, n_bit: int) -> Tensor:
    """DoReFa's ``quantize_k``: ``q_b(r) = round((2^b-1)·r)/(2^b-1)`` for ``r ∈ [0, 1]``, straight through."""
    n = 2**n_bit - 1
    return round_ste(r * n) / n


def dorefa_weight(w: Tensor, n_bit: int) -> Tensor:
    """DoReFa weights: ``2·q_b(tanh(w)/(2·max|tanh(w)|) + 1/2) - 1`` (max over the whole tensor)."""
    t = torch.tanh(w)
    return 2 * dorefa_quantize_k(t / (2 * t.abs().max()) + 0.5, n_bit) - 1


def dorefa_activation(x: Tensor, n_bit: int) -> Tensor:
    """DoReFa activations: ``q_b(clamp(x, 0, 1))``."""
    return dorefa_quantize_k(torch.clamp(x, 0, 1), n_bit)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _lsq_initial_step(t: Tensor, q_p: int) -> Tensor:
    """LSQ's initial step ``2·mean|t|/sqrt(Q_P)``, averaged over processes under torch.distributed
    (each sees its own first batch; the step must start equal everywhere)."""
    value = 2 * t.detach().abs().mean() / math.sqrt(q_p)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class _LSQStep(nn.Module):
    """A learned step ``step [1]`` initialised once from data (``initialized [1]``, in the state dict)."""

    def _init_step(self, values: Tensor, q_p: int) -> None:
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                self.step.copy_(_lsq_initial_step(values, q_p).reshape(1))
                self.initialized.fill_(1)


class LSQActivation(_LSQStep):
    """LSQ on activations (unsigned): step initialised from the first training batch, gradient scale
    ``1/sqrt(N·Q_P)`` with ``N`` the elements of one sample's activation."""

    def __init__(self, n_bit: int):
        super().__init__()
        check_bits(n_bit, "LSQActivation")
        self.n_bit = n_bit
        self.step = nn.Parameter(torch.ones(1))
        self.register_buffer("initialized", torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        _, q_p = lsq_bounds(self.n_bit, signed=False)
        self._init_step(x, q_p)
        per_sample = x[0].numel() if x.dim() > 1 else x.numel()
        return lsq_quantize(x, self.step, self.n_bit, False, 1.0 / math.sqrt(per_sample * q_p))

    def extra_repr(self) -> str:
        return f"n_bit={self.n_bit}"


class PACTActivation(nn.Module):
    """PACT on activations: a learned clip ``clip_alpha [1]`` (initialised to 10, as in the paper;
    trained with L2 decay, see :mod:`n2uq.recipe`)."""

    def __init__(self, n_bit: int, init_alpha: float = 10.0):
        super().__init__()
        check_bits(n_bit, "PACTActivation")
        self.n_bit = n_bit
        self.clip_alpha = nn.Parameter(torch.tensor([float(init_alpha)]))

    def forward(self, x: Tensor) -> Tensor:
        return pact_quantize(x, self.clip_alpha, self.n_bit)

    def extra_repr(self) -> str:
        return f"n_bit={self.n_bit}"


class DoReFaActivation(nn.Module):
    """DoReFa-Net on activations (no parameters)."""

    def __init__(self, n_bit: int):
        super().__init__()
        check_bits(n_bit, "DoReFaActivation")
        self.n_bit = n_bit

    def forward(self, x: Tensor) -> Tensor:
        return dorefa_activation(x, self.n_bit)

    def extra_repr(self) -> str:
        return f"n_bit={self.n_bit}"


class _QuantizedConv(nn.Module):
    """A convolution whose weight goes through ``quantized_weight()``; the weight is initialised as
    :class:`~n2uq.quant.HardQuantizeConv`'s, so that only the quantizer differs between methods."""

    def __init__(self, in_chn: int, out_chn: int, n_bit: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, groups: int = 1):
        super().__init__()
        if in_chn % groups or out_chn % groups:
            raise ValueError(f"{type(self).__name__}: channels {in_chn}->{out_chn} not divisible by groups={groups}")
        self.in_chn, self.out_chn, self.n_bit = in_chn, out_chn, n_bit
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self.weight = nn.Parameter((torch.rand(out_chn, in_chn // groups, kernel_size, kernel_size) - 0.5) * 0.001)

    def quantized_weight(self) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(x, self.quantized_weight(), self.stride, self.padding, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_chn}, {self.out_chn}, n_bit={self.n_bit}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


class LSQConv(_QuantizedConv, _LSQStep):
    """Convolution with LSQ weights (signed): one step per layer, initialised from the weights at the
    first training forward (after any pretrained weights are loaded), gradient scale
    ``1/sqrt(N·Q_P)`` with ``N`` the layer's weight count."""

    def __init__(self, in_chn: int, out_chn: int, n_bit: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, groups: int = 1):
        check_bits(n_bit, "LSQConv", low=2)  # signed 1-bit LSQ has Q_P = 0
        super().__init__(in_chn, out_chn, n_bit, kernel_size, stride, padding, groups)
        self.step = nn.Parameter(torch.ones(1))
        self.register_buffer("initialized", torch.zeros(1))

    def quantized_weight(self) -> Tensor:
        _, q_p = lsq_bounds(self.n_bit, signed=True)
        self._init_step(self.weight, q_p)
        return lsq_quantize(self.weight, self.step, self.n_bit, True, 1.0 / math.sqrt(self.weight.numel() * q_p))


class DoReFaConv(_QuantizedConv):
    """Convolution with DoReFa-Net weights (no extra parameters)."""

    def __init__(self, in_chn: int, out_chn: int, n_bit: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, groups: int = 1):
        check_bits(n_bit, "DoReFaConv")
        super().__init__(in_chn, out_chn, n_bit, kernel_size, stride, padding, groups)

    def quantized_weight(self) -> Tensor:
        return dorefa_weight(self.weight, self.n_bit)
