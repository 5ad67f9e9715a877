"""N2UQ's quantizers as the paper states them, in plain PyTorch: the definitions.

This file is the method. :mod:`n2uq.kernels` computes the same values faster (C, Triton, fused
operators), using LTQ's per-call formulas from here (thresholds, breakpoints, G-STE's slopes and
parameter gradients), and is tested against what is written here. ``n2uq.LTQ`` and its siblings are
these classes running those operators; with ``N2UQ_KERNELS=reference`` everything runs these
definitions module by module, so an edit here is what the models train and evaluate with.

* :class:`LTQ` — activation quantizer with learnable, *non-uniform* input thresholds and *uniform*
  output levels (the paper's quantizer x^q, Fig. 1b), trained with the generalized straight-through
  estimator G-STE (the paper's expectation E[x̃^q] of stochastic rounding): :class:`LTQFunction`.
* :class:`HardQuantizeConv` — convolution with uniform weights on an L1-norm scale (the paper's
  entropy-preserving weight regularization) and a straight-through estimator.
* :class:`PACT` — clipped uniform activation quantizer, used once in MobileNetV2.
* :class:`LearnableBias` — per-channel shift; ``LearnableBias → PReLU → LearnableBias`` is RPReLU.

Paper: Liu, Cheng, Huang, Xing, Shen, *Nonuniform-to-Uniform Quantization: Towards Accurate
Quantization via Generalized Straight-Through Estimation*, CVPR 2022 (arXiv 2111.14826). Where the
paper and the code behind its released checkpoints differ, the code wins (docs/SPEC.md): the float
additions below happen in its order and the state-dict names are its names, so those checkpoints
load strictly and give the same outputs.

Notation: ``b`` bits, ``n = 2^b - 1`` steps, ``interval = 2 / n``, ``a⁺ = max(a, eps)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from n2uq.arrays import as_dtype, joined, suffix_sums, where_or_zero
from n2uq.bitwidth import NumBitsAlias, bits_argument, check_bits
from n2uq.numerics import conv2d

__all__ = ["LTQ", "LTQFunction", "HardQuantizeConv", "PACT", "LearnableBias", "ltq_forward_thresholds",
           "ltq_breakpoints", "gste_slopes", "GSTESums", "GSTEParamGrads", "gste_param_grads", "ltq_level_table",
           "ltq_codes", "weight_scale", "quantize_weight", "QuantizedWeight", "MaxAbsQuantizeConv"]


# --- LTQ: learnable thresholds, uniform outputs ----------------------------------------------


def ltq_forward_thresholds(start, a_pos):
    """Input thresholds ``T``: the midpoints of the learned intervals (quantizer x^q).

    ``T[0] = start + a⁺[0]/2``, ``T[i] = T[i-1] + (a⁺[i-1]/2 + a⁺[i]/2)``, added one term at a time
    in the parameters' precision, as the authors' code does (so the codes are bit-identical). Written
    with arithmetic only: ``start [1]``/``a_pos [n]`` tensors give a tensor; a NumPy scalar and
    array (the CPU fast path's per-call state) give an array, from the same IEEE operations.
    """
    half = a_pos / 2
    thresholds = [start + half[0]]
    for i in range(1, len(half)):
        thresholds.append(thresholds[-1] + (half[i - 1] + half[i]))
    return joined(thresholds)


def ltq_breakpoints(start, a_pos):
    """Interval ends ``d`` of the G-STE surrogate: ``d[0] = start``, ``d[k] = d[k-1] + a⁺[k-1]``
    (tensors or NumPy, as :func:`ltq_forward_thresholds`)."""
    breakpoints = [start]
    for length in a_pos:
        breakpoints.append(breakpoints[-1] + length)
    return joined(breakpoints)


def gste_slopes(a_pos):
    """G-STE's slope on each learned interval: ``interval / a⁺[k]`` (``interval = 2/n``).

    Evaluated as ``(1/a⁺)·interval`` — the operations PyTorch runs for ``interval / a⁺`` — so a
    tensor and a NumPy array (or a Triton kernel) give the same bits.
    """
    return (1 / a_pos) * (2.0 / len(a_pos))


def ltq_level_table(n_levels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The uniform output levels ``L[0] = 0``, ``L[k] = L[k-1] + interval`` (``n_levels = 2^b``).

    The Python float ``interval = 2 / (2^b - 1)`` is added step by step, as the authors' code builds them.
    """
    interval = 2.0 / (n_levels - 1)
    levels = [torch.zeros(1, dtype=dtype)]
    for _ in range(n_levels - 1):
        levels.append(levels[-1] + interval)
    return torch.cat(levels)


def ltq_codes(xs: Tensor, thresholds: Tensor) -> Tensor:
    """The output code ``m = #{i : xs > T[i]}`` (strict ``>``), in ``0..n``: ``y = L[m]·scale2``.

    Every comparison with NaN is false, so NaN gives code 0; ``+inf`` gives ``n``, ``-inf`` 0.
    """
    codes = torch.zeros_like(xs, dtype=torch.int64)
    for threshold in thresholds.to(xs.dtype):
        codes += xs > threshold
    return codes


class GSTESums(NamedTuple):
    """What G-STE needs from the elements (every implementation computes these): ``grad`` is the
    output's gradient, ``xs = scale1·x``, interval ``k`` is ``(d[k-1], d[k]]`` (k = 1..n)."""

    grad: Tensor  # [n] G_k = Σ grad over interval k
    offset: Tensor  # [n] Q_k = Σ grad·(xs - d[k-1]) over interval k
    scale1: Tensor  # [] Σ ∂L/∂xs · x: the gradient of scale1
    scale2: Tensor  # [] Σ grad · L[m]: the gradient of scale2 (∂y/∂scale2 = L[m])


class GSTEParamGrads(NamedTuple):
    start: Tensor  # [1]
    a: Tensor  # [n]
    scale1: Tensor  # [1]
    scale2: Tensor  # [1]


def gste_param_grads(sums: GSTESums, a_pos: Tensor, a: Tensor, eps: Tensor, scale2: Tensor) -> GSTEParamGrads:
    """Gradients of LTQ's parameters from the per-interval sums (G-STE, SPEC §1), in the sums' dtype.

    On interval k ``g = slope_k·(xs - d[k-1]) + (k-1)·interval`` with ``slope_k = interval/a⁺[k-1]``
    (:func:`gste_slopes`), so ``W_k = Σ ∂L/∂xs = scale2·slope_k·G_k`` and
    ``R_k = Σ ∂L/∂xs·(xs - d[k-1]) = scale2·slope_k·Q_k``. ``d[k-1]`` moves with ``start`` and with
    every ``a⁺[j]``, ``j < k-1``, and ``slope_k`` with ``a⁺[k-1]``::

        ∂/∂start = -Σ_k W_k        ∂/∂a⁺[j] = -R_{j+1}/a⁺[j] - Σ_{k > j+1} W_k

    masked to ``a > eps`` (the clamp ``a⁺ = max(a, eps)`` passes no gradient). Results have the
    parameters' dtype. Tensors give tensors; NumPy arrays (the CPU fast path's sums and parameters)
    give arrays, from the same operations.
    """
    real, a_pos = sums.grad.dtype, as_dtype(a_pos, a_pos.dtype)  # a_pos detached
    coef = as_dtype(scale2, real) * as_dtype(gste_slopes(a_pos), real)  # scale2·slope_k
    w = coef * sums.grad  # W_k
    r = coef * sums.offset  # R_k
    later = suffix_sums(w)  # later[j] = Σ_{k > j} W_k (0-based)
    grad_a_pos = -r / as_dtype(a_pos, real) - later
    grad_a = where_or_zero(a > eps, as_dtype(grad_a_pos, a.dtype))
    as_param = [as_dtype(t, a.dtype).reshape(1) for t in (-w.sum(), sums.scale1, sums.scale2)]
    return GSTEParamGrads(as_param[0], grad_a, as_param[1], as_param[2])


class LTQFunction(torch.autograd.Function):
    """``LTQFunction.apply(x, start, a, scale1, scale2, eps, levels)``: LTQ's forward and its G-STE.

    Forward: the uniform level ``L[m]·scale2`` of the code ``m`` of ``xs = scale1·x``.
    Backward: the gradient of ``scale2·g(xs)``, where ``g`` = E[x̃^q] is the expectation of
    stochastic rounding over the learned intervals — piecewise linear through the breakpoints::

        g(xs) = 0                                              xs <= d[0]
        g(xs) = interval/a⁺[k-1]·(xs - d[k-1]) + (k-1)·interval  d[k-1] < xs <= d[k]
        g(xs) = 2                                              xs > d[n]

    and ``∂y/∂scale2 = L[m]`` (the forward level). Only the inputs are saved for backward. The
    parameter gradients come from :class:`GSTESums` through :func:`gste_param_grads`, the same
    function every fast implementation calls.
    """

    @staticmethod
    def forward(ctx, x, start, a, scale1, scale2, eps, levels):  # type: ignore[override]
        a_pos = torch.where(a > eps, a, eps)  # a⁺: the learned interval lengths, at least eps
        xs = x * scale1  # the scaled input
        thresholds = ltq_forward_thresholds(start, a_pos)  # T: midpoints of the intervals
        codes = ltq_codes(xs, thresholds)  # m = #{i : xs > T[i]}
        table = levels.to(xs.dtype) * scale2  # the n + 1 uniform outputs L[k]·scale2
        ctx.save_for_backward(x, start, a, scale1, scale2, eps, levels)
        return table[codes]

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, start, a, scale1, scale2, eps, levels = ctx.saved_tensors
        a_pos = torch.where(a > eps, a, eps)
        xs = x * scale1
        d = ltq_breakpoints(start, a_pos).to(xs.dtype)  # d[0] = start, d[k] = d[k-1] + a⁺[k-1]
        slopes = gste_slopes(a_pos)
        grad_g = grad_y * scale2  # y's gradient is that of scale2·g(xs)
        grad_xs = torch.zeros_like(xs)
        sum_grad, sum_offset = [], []
        for k in range(1, a.numel() + 1):  # the k-th learned interval (d[k-1], d[k]]
            inside = (xs > d[k - 1]) & (xs <= d[k])
            grad_xs += torch.where(inside, grad_g, 0.0) * slopes[k - 1]  # ∂g/∂xs = slope_k
            grad_here = torch.where(inside, grad_y, 0.0)
            sum_grad.append(grad_here.sum())
            sum_offset.append((grad_here * torch.where(inside, xs - d[k - 1], 0.0)).sum())
        codes = ltq_codes(xs, ltq_forward_thresholds(start, a_pos))
        sums = GSTESums(torch.stack(sum_grad), torch.stack(sum_offset), (grad_xs * x).sum(),  # ∂xs/∂scale1 = x
                        (grad_y * levels.to(xs.dtype)[codes]).sum())  # ∂y/∂scale2 = L[m]
        grads = gste_param_grads(sums, a_pos, a, eps, scale2)
        grad_x = (grad_xs * scale1).to(x.dtype)  # ∂xs/∂x = scale1
        return grad_x, grads.start, grads.a, grads.scale1, grads.scale2, None, None


class LTQ(nn.Module):
    """Learnable-threshold quantizer: non-uniform input thresholds, uniform outputs.

    ``xs = scale1·x``; the thresholds are the midpoints of ``n`` learned intervals of lengths
    ``a⁺`` starting at ``start``; the output is ``scale2·L[m]`` where ``m`` counts the thresholds
    below ``xs`` and ``L = {0, 2/n, ..., 2}``. Trained through :class:`LTQFunction` (G-STE).

    Args:
        n_bit: activation bit width, 1 to 8.

    State dict: ``start [1]``, ``a [n]``, ``scale1 [1]``, ``scale2 [1]`` (trained) and the
    constants ``two, one, zero, minusone, eps`` (buffers, never trained) — the names of the authors' code.
    """

    def __init__(self, n_bit: int):
        super().__init__()
        self.n_bit = check_bits(n_bit, "LTQ")
        self.n_val = 2**n_bit - 1
        self.interval = 2.0 / self.n_val
        self.start = nn.Parameter(torch.tensor([0.0]))
        self.a = nn.Parameter(torch.full((self.n_val,), self.interval))
        self.scale1 = nn.Parameter(torch.tensor([1.0]))
        self.scale2 = nn.Parameter(torch.tensor([1.0]))
        # Constants kept only so the authors' checkpoints load strictly.
        self.register_buffer("two", torch.tensor([2.0]))
        self.register_buffer("one", torch.tensor([1.0]))
        self.register_buffer("zero", torch.tensor([0.0]))
        self.register_buffer("minusone", torch.tensor([-1.0]))
        self.register_buffer("eps", torch.tensor([1e-3]))
        self.register_buffer("levels", ltq_level_table(self.n_val + 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return LTQFunction.apply(x, self.start, self.a, self.scale1, self.scale2, self.eps, self.levels)

    @torch.no_grad()
    def thresholds(self) -> Tensor:
        """The input thresholds ``T`` on the scaled input ``scale1·x`` (length n)."""
        return ltq_forward_thresholds(self.start, torch.where(self.a > self.eps, self.a, self.eps))

    @torch.no_grad()
    def breakpoints(self) -> Tensor:
        """The interval ends ``d`` of the G-STE surrogate on ``scale1·x`` (length n + 1)."""
        return ltq_breakpoints(self.start, torch.where(self.a > self.eps, self.a, self.eps))

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Integer output codes ``m`` in ``0..2^b-1`` (int64), so that ``forward(x) = L[m]·scale2``."""
        return ltq_codes(x * self.scale1, self.thresholds())

    def extra_repr(self) -> str:
        return f"n_bit={self.n_bit}"


# --- Weights: uniform levels on an L1-norm ("entropy preserving") scale ----------------------


def weight_scale(weight: Tensor, n_bit: int) -> Tensor:
    """Per-output-channel scale ``s = γ·mean|W|`` with ``γ = (2^b - 1)/2^(b-1)``, detached.

    The paper's entropy-preserving weight regularization: for bell-shaped weights this scale spreads
    them evenly over the 2^b levels. The mean runs over kernel width, height, then input channels.
    """
    gamma = (2**n_bit - 1) / 2 ** (n_bit - 1)
    w_abs = weight.detach().abs()
    return gamma * w_abs.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)


class QuantizedWeight(NamedTuple):
    scale: Tensor  # s [out, 1, 1, 1]
    scaled: Tensor  # W_s = W / s (differentiable)
    level: Tensor  # round((W_c + c/2)·n_w), an integer in 0..2^b-1 (as float)
    quantized: Tensor  # W_q = s·(level/n_w - c/2) on the uniform grid


def quantize_weight(weight: Tensor, s: Tensor, n_bit: int, clip_val: Tensor) -> QuantizedWeight:
    """``W_s = W/s``, clipped to ``±c/2`` and rounded to ``2^b`` uniform levels: ``W_q``.

    ``W_q = s·(round((W_c + c/2)·n_w)/n_w - c/2)`` with ``n_w = (2^b - 1)/c``. With ``c = 2`` the
    levels are the odd multiples ``k·s/n``, ``k ∈ {-n, -n+2, ..., n}``: symmetric, no zero.
    """
    w_scaled = weight / s
    half = clip_val / 2
    w_clip = torch.where(w_scaled < half, w_scaled, half)
    w_clip = torch.where(w_clip > -half, w_clip, -half)
    steps = (2**n_bit - 1) / clip_val
    level = torch.round((w_clip + half) * steps)
    return QuantizedWeight(s, w_scaled, level, s * (level / steps - half))


class HardQuantizeConv(NumBitsAlias, nn.Module):
    """Convolution with uniformly quantized, L1-scaled weights and a straight-through estimator.

    The convolution uses ``(W_q - W_s).detach() + W_s``: value ``W_q`` (:func:`quantize_weight`),
    gradient ``1/s`` with no clipping mask. ``clip_val`` stays 2 and receives no gradient.

    State dict (the authors' order): ``clip_val [1]``, ``zero [1]``, ``weight [out, in/groups, k, k]``;
    ``clip_val`` and ``zero`` are non-trainable parameters (``requires_grad=False``). The bit width
    is ``n_bit`` (third argument); the authors' keyword ``num_bits=`` is accepted too, and
    ``.num_bits`` reads it.
    """

    def __init__(self, in_chn: int, out_chn: int, n_bit: Optional[int] = None, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, groups: int = 1, *, num_bits: Optional[int] = None):
        super().__init__()
        n_bit = bits_argument(type(self).__name__, n_bit, num_bits)
        if in_chn % groups or out_chn % groups:
            raise ValueError(f"HardQuantizeConv: channels {in_chn}->{out_chn} not divisible by groups={groups}")
        self.in_chn, self.out_chn = in_chn, out_chn
        self.n_bit = n_bit
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self.shape = (out_chn, in_chn // groups, kernel_size, kernel_size)
        self.clip_val = nn.Parameter(torch.tensor([2.0]), requires_grad=False)
        self.zero = nn.Parameter(torch.tensor([0.0]), requires_grad=False)
        self.weight = nn.Parameter((torch.rand(self.shape) - 0.5) * 0.001)

    def scale(self) -> Tensor:
        """``s = γ·mean|W|`` per output channel (:func:`weight_scale`), detached."""
        return weight_scale(self.weight, self.n_bit)

    def quantized_weight(self) -> Tensor:
        """The weight the convolution uses: value ``W_q``, gradient ``1/s`` (straight through)."""
        q = quantize_weight(self.weight, self.scale(), self.n_bit, self.clip_val)
        return (q.quantized.detach() - q.scaled.detach()) + q.scaled

    @torch.no_grad()
    def weight_codes(self) -> tuple[Tensor, Tensor]:
        """Odd integer codes and step: ``W_q = codes · (s / n)``, ``codes ∈ [-n, n]``.

        Returns ``(codes int64 [out, in/g, k, k], step float [out])`` with ``step = s / n``.
        Assumes ``clip_val = 2`` (the value every released model uses).
        """
        n = 2**self.n_bit - 1
        q = quantize_weight(self.weight, self.scale(), self.n_bit, self.clip_val)
        return (2 * q.level - n).to(torch.int64), (q.scale / n).reshape(-1)

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(x, self.quantized_weight(), self.stride, self.padding, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_chn}, {self.out_chn}, n_bit={self.n_bit}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


class MaxAbsQuantizeConv(HardQuantizeConv):
    """Ablation of the entropy-preserving scale: ``s = max|W|`` per output channel instead of
    ``γ·mean|W|``, so the uniform grid spans each channel's full range (everything else, state dict
    included, as :class:`HardQuantizeConv`)."""

    def scale(self) -> Tensor:
        return self.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True)


# --- PACT and LearnableBias ------------------------------------------------------------------


class PACT(NumBitsAlias, nn.Module):
    """PACT activation quantizer as the authors' code uses it before MobileNetV2's last 1×1 conv.

    ``x = clip(relu(x), c)``; ``y = round(x·n_q)/n_q + x - x.detach()`` with ``n_q = (2^b-1)/c``.
    Plain autograd of exactly that expression: ``x`` gets gradient where ``0 < x < c``; ``c`` gets
    the clipped elements' gradient plus ``Σ grad·round(x·n_q)/(2^b-1)`` (from the ``1/n_q`` factor).

    Why a second PACT: :class:`n2uq.baselines.PACTActivation` is PACT as its paper states it (the
    compared method; clip ``clip_alpha``, straight through the rounding, no gradient from it). This
    one is the authors' variant, kept so MobileNetV2 and its released checkpoint (state-dict key
    ``clip_val``) train and evaluate as theirs. Bit width: ``n_bit`` (or ``num_bits=``).
    """

    def __init__(self, n_bit: Optional[int] = None, init_act_clip_val: float = 2, *,
                 num_bits: Optional[int] = None):
        super().__init__()
        self.n_bit = bits_argument("PACT", n_bit, num_bits)
        self.clip_val = nn.Parameter(torch.tensor([float(init_act_clip_val)]))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(x)
        x = torch.where(x < self.clip_val, x, self.clip_val)
        steps = (2**self.n_bit - 1) / self.clip_val
        return torch.round(x * steps) / steps + x - x.detach()

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Integer codes ``round(clip(relu(x), c)·n_q)`` in ``0..2^b-1``."""
        x = torch.relu(x)
        x = torch.where(x < self.clip_val, x, self.clip_val)
        return torch.round(x * ((2**self.n_bit - 1) / self.clip_val)).to(torch.int64)

    def extra_repr(self) -> str:
        return f"n_bit={self.n_bit}"


class LearnableBias(nn.Module):
    """``y = x + bias`` with a per-channel learnable ``bias [1, C, 1, 1]``.

    ``LearnableBias → PReLU → LearnableBias`` is the paper's RPReLU before each quantizer.
    """

    def __init__(self, out_chn: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, out_chn, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias.expand_as(x)
