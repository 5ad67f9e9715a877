"""The N2UQ quantizers (SPEC §1-§4).

* :class:`LTQ` — activation quantizer with learnable, *non-uniform* input thresholds and
  *uniform* output levels, trained with the generalized straight-through estimator (G-STE).
* :class:`HardQuantizeConv` — convolution with L1-norm "entropy-preserving" uniform weights.
* :class:`PACT` — clipped uniform activation quantizer (used once in MobileNetV2).
* :class:`LearnableBias` — per-channel learnable shift (the two halves of "RPReLU").

Paper: Liu et al., *Nonuniform-to-Uniform Quantization: Towards Accurate Quantization via
Generalized Straight-Through Estimation*, CVPR 2022 (arXiv 2111.14826). Formulas below are named
by what they define in that paper (its forward quantizer x^q, the G-STE expectation E[x̃^q],
Fig. 1b) and by the SPEC section (docs/SPEC.md) that states them exactly.

The state-dict names and shapes are those of the code that produced the released checkpoints,
so those checkpoints load strictly.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from n2uq.kernels import get_backend

__all__ = [
    "LTQ",
    "HardQuantizeConv",
    "PACT",
    "LearnableBias",
    "ltq_forward_thresholds",
    "ltq_breakpoints",
    "ltq_level_table",
    "ltq_codes",
    "ltq_lookup",
    "memory_order",
    "LTQState",
    "ltq_state",
    "ltq_param_grads",
    "ltq_grads_torch",
    "quantized_weight_value",
]


# ---------------------------------------------------------------------------------------------
# LTQ helpers: thresholds, breakpoints and the output level table, accumulated in the exact
# float order of the reference so that forward codes are bit-identical.
# ---------------------------------------------------------------------------------------------


def _sequential_cumsum(first: Tensor, increments: Tensor) -> Tensor:
    """``out[0] = first; out[i] = out[i-1] + increments[i-1]`` in the tensors' own precision.

    ``torch.cumsum`` may accumulate in higher precision (CPU) or in a tree order (CUDA); the
    reference adds one term at a time, so we do too. ``increments`` has at most 255 entries.
    """
    values = [first.reshape(())]
    for inc in increments.unbind(0):
        values.append(values[-1] + inc)
    return torch.stack(values)


def ltq_forward_thresholds(start: Tensor, a_pos: Tensor) -> Tensor:
    """Forward thresholds ``t`` (SPEC §1; the paper's x^q, Fig. 1b): midpoints of the learned intervals.

    ``t[0] = start + a⁺[0]/2``, ``t[i] = t[i-1] + (a⁺[i-1]/2 + a⁺[i]/2)``. Non-decreasing in
    float arithmetic because every increment is ≥ eps/2 > 0.
    """
    half = a_pos / 2
    return _sequential_cumsum(start.reshape(()) + half[0], half[:-1] + half[1:])


def ltq_breakpoints(start: Tensor, a_pos: Tensor) -> Tensor:
    """Backward breakpoints ``d`` (SPEC §1): ``d[0] = start``, ``d[k] = d[k-1] + a⁺[k-1]``."""
    return _sequential_cumsum(start.reshape(()), a_pos)


def ltq_level_table(n_levels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform output levels ``L[0] = 0, L[k] = L[k-1] + interval`` (SPEC §1), ``n_levels = 2^b``.

    The interval is the Python float ``2 / (2^b - 1)`` added to a tensor step by step, exactly as
    the reference builds its ``step_right`` values.
    """
    interval = 2.0 / (n_levels - 1)
    level = torch.zeros(1, dtype=dtype)
    levels = [level.clone()]
    for _ in range(n_levels - 1):
        level = level + interval
        levels.append(level.clone())
    return torch.cat(levels)


def memory_order(t: Tensor) -> Optional[tuple[list[int], list[int]]]:
    """``(perm, inverse)`` such that ``t.permute(perm)`` is a contiguous view of ``t``.

    ``None`` when ``t`` is contiguous already or not dense in any dimension order (e.g. a strided
    slice). For a channels_last tensor ``perm`` is ``[0, 2, 3, 1]``: elementwise work done on the
    permuted view and permuted back by ``inverse`` keeps the input's layout without a copy.
    """
    if t.is_contiguous():
        return None
    perm = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    if not t.permute(perm).is_contiguous():
        return None
    inverse = [0] * t.dim()
    for i, d in enumerate(perm):
        inverse[d] = i
    return perm, inverse


def _bucketize(xs: Tensor, boundaries: Tensor) -> Tensor:
    """``torch.bucketize(xs, boundaries, right=False)`` in the memory layout of ``xs``.

    bucketize wants a contiguous input (else it copies and warns); a channels_last (or any dense
    permuted) ``xs`` is searched through its contiguous permuted view instead, and the codes come
    back with the strides of ``xs``. Only a non-dense ``xs`` is copied.
    """
    order = memory_order(xs)
    if order is None:
        return torch.bucketize(xs.contiguous(), boundaries, right=False)
    perm, inverse = order
    return torch.bucketize(xs.permute(perm), boundaries, right=False).permute(inverse)


def ltq_lookup(table: Tensor, codes: Tensor) -> Tensor:
    """``table[codes]`` with the memory layout of ``codes`` (plain indexing returns contiguous)."""
    order = memory_order(codes)
    if order is None:
        return table[codes]
    perm, inverse = order
    return table[codes.permute(perm)].permute(inverse)


def ltq_codes(xs: Tensor, thresholds: Tensor) -> Tensor:
    """Integer code ``m = #{i : xs > t[i]}`` (strict), in ``0..n`` (SPEC §1), in the layout of ``xs``.

    ``torch.bucketize(..., right=False)`` returns the number of boundaries strictly below each
    value, which is ``m`` because the thresholds are non-decreasing.
    """
    return _bucketize(xs, thresholds.to(xs.dtype))


class LTQState(NamedTuple):
    """What forward and backward derive from LTQ's parameters, computed once per forward.

    ``a_pos``/``slope`` are in the parameters' dtype; the rest is cast to the compute dtype
    (that of ``x * scale1``), exactly as the elementwise code would promote them.
    """

    a_pos: Tensor  # [n] max(a, eps)
    thresholds: Tensor  # [n] forward thresholds t (SPEC §1)
    breakpoints: Tensor  # [n+1] backward breakpoints d
    levels: Tensor  # [n+1] uniform levels L
    table: Tensor  # [n+1] output values L * scale2
    slope: Tensor  # [n] interval / a_pos


def ltq_state(start: Tensor, a: Tensor, scale2: Tensor, eps: Tensor, levels: Tensor,
              dtype: torch.dtype) -> LTQState:
    """Thresholds, breakpoints, level table and slopes of an LTQ (SPEC §1), detached.

    For CPU parameters the sequential accumulations run on NumPy scalars of the parameters' dtype
    (IEEE float32/float64 adds in the same order as :func:`_sequential_cumsum`, so bit-identical)
    instead of one tiny PyTorch op per step.
    """
    with torch.no_grad():
        if start.device.type == "cpu" and a.dtype in _NUMPY_DTYPES and start.dtype == a.dtype == eps.dtype:
            return _ltq_state_numpy(start, a, scale2, eps, levels, dtype)
        if get_backend() != "torch" and start.is_cuda:
            from n2uq.kernels import triton_ops

            if triton_ops.state_supported(a, dtype, start, eps, scale2, levels):  # one launch, same values
                a_pos, thresholds, breakpoints, slope, table = triton_ops.ltq_state(start, a, eps, scale2, levels)
                return LTQState(a_pos, thresholds, breakpoints, levels, table, slope)
        a_pos = torch.where(a > eps, a, eps)
        levels_c = levels.to(dtype)
        return LTQState(
            a_pos=a_pos,
            thresholds=ltq_forward_thresholds(start, a_pos).to(dtype),
            breakpoints=ltq_breakpoints(start, a_pos).to(dtype),
            levels=levels_c,
            table=levels_c * scale2.to(dtype),
            slope=((2.0 / a.numel()) / a_pos).to(dtype),
        )


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _ltq_state_numpy(start: Tensor, a: Tensor, scale2: Tensor, eps: Tensor, levels: Tensor,
                     dtype: torch.dtype) -> LTQState:
    real = _NUMPY_DTYPES[a.dtype]
    a_np = a.detach().numpy()
    eps_v = eps.detach().numpy()[0]
    start_v = start.detach().numpy()[0]
    a_pos = np.where(a_np > eps_v, a_np, eps_v).astype(real, copy=False)
    half = a_pos / real(2)
    # np.cumsum adds one term at a time in the array's dtype: the order of _sequential_cumsum.
    thresholds = np.empty(a_pos.size, real)
    thresholds[0] = start_v + half[0]
    thresholds[1:] = half[:-1] + half[1:]
    np.cumsum(thresholds, out=thresholds)
    breakpoints = np.empty(a_pos.size + 1, real)
    breakpoints[0] = start_v
    breakpoints[1:] = a_pos
    np.cumsum(breakpoints, out=breakpoints)
    slope = (real(1) / a_pos) * real(2.0 / a_pos.size)  # `(2 / n) / a_pos`: torch's reciprocal, then multiply
    np_dtype = _NUMPY_DTYPES.get(dtype)
    levels_c = levels if levels.dtype == dtype else levels.to(dtype)
    as_compute = (lambda v: torch.from_numpy(v.astype(np_dtype, copy=False))) if np_dtype else (
        lambda v: torch.from_numpy(v).to(dtype))
    return LTQState(
        a_pos=torch.from_numpy(a_pos),
        thresholds=as_compute(thresholds),
        breakpoints=as_compute(breakpoints),
        levels=levels_c,
        table=levels_c * scale2.detach().to(dtype),
        slope=as_compute(slope),
    )


def ltq_param_grads(sums: Tensor, state: LTQState, a: Tensor, eps: Tensor, scale2: Tensor,
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``start, a, scale1, scale2`` from the per-interval sums of the G-STE backward.

    ``sums`` (float64) = ``[G(n), Q(n), S1, S2, ...]``: for inner interval k (``d[k-1] < xs <= d[k]``)
    ``G_k = Σ g`` and ``Q_k = Σ g·(xs - d[k-1])`` over its elements, ``S1 = Σ grad_xs·x``,
    ``S2 = Σ g·L[m]``. With ``slope_k = interval / a⁺[k-1]`` (SPEC §1, the paper's G-STE expectation E[x̃^q]):
    ``W_k = Σ grad_xs = scale2·slope_k·G_k`` and ``R_k = Σ grad_xs·(xs - d[k-1]) = scale2·slope_k·Q_k``;
    then ``∂/∂start = -Σ W``, ``∂/∂a⁺[j] = -R_j/a⁺[j] - Σ_{k>j} W_k``, masked to ``a > eps``.
    """
    n = a.numel()
    if sums.device.type == "cpu":  # small vectors: NumPy is cheaper than a dozen tiny PyTorch ops
        return _param_grads_numpy(sums.numpy(), state, a, eps, scale2)
    if get_backend() != "torch" and sums.is_cuda:
        from n2uq.kernels import triton_ops

        if triton_ops.state_supported(a, state.slope.dtype, eps, scale2, state.levels):  # one launch
            return triton_ops.ltq_param_grads(sums, state.slope, state.a_pos, a, eps, scale2)
    coef = scale2.detach().double() * state.slope.double()
    W = coef * sums[:n]
    R = coef * sums[n : 2 * n]
    later = W.flip(0).cumsum(0).flip(0)  # later[j] = Σ_{k >= j} W[k]
    later = torch.cat([later[1:], later.new_zeros(1)])
    grad_a_pos = -R / state.a_pos.double() - later
    grad_a = torch.where(a > eps, grad_a_pos.to(a.dtype), torch.zeros_like(a))
    grad_start = (-W.sum()).to(a.dtype).reshape(1)
    return grad_start, grad_a, sums[2 * n].to(a.dtype).reshape(1), sums[2 * n + 1].to(a.dtype).reshape(1)


def _param_grads_numpy(sums: np.ndarray, state: LTQState, a: Tensor, eps: Tensor, scale2: Tensor):
    n = a.numel()
    coef = float(scale2.detach()) * state.slope.numpy().astype(np.float64)
    W = coef * sums[:n]
    R = coef * sums[n : 2 * n]
    later = np.zeros(n)
    np.cumsum(W[:0:-1], out=later[-2::-1])  # later[j] = sum of W[k] for k > j
    grad_a_pos = -R / state.a_pos.numpy().astype(np.float64) - later
    mask = a.detach().numpy() > eps.detach().numpy()
    out = np.empty(n + 3)
    out[0] = -W.sum()
    out[1 : n + 1] = np.where(mask, grad_a_pos, 0.0)
    out[n + 1 :] = sums[2 * n : 2 * n + 2]
    return tuple(torch.from_numpy(out).to(a.dtype).split([1, n, 1, 1]))  # views of one tensor


class _LTQFunction:
    """``_LTQFunction.apply(x, start, a, scale1, scale2, eps, levels)``: LTQ forward (uniform levels)
    with its closed-form G-STE backward (SPEC §1) — the operator ``n2uq::ltq_stage`` without the
    RPReLU chain (:mod:`n2uq.kernels.ops`), which saves only ``x`` and the parameters."""

    @staticmethod
    def apply(x: Tensor, start: Tensor, a: Tensor, scale1: Tensor, scale2: Tensor, eps: Tensor,
              levels: Tensor) -> Tensor:
        return ltq_stage(x, None, None, None, start, a, scale1, scale2, eps, levels)[0]


def ltq_grads_torch(grad_out: Tensor, x: Tensor, a: Tensor, scale1: Tensor, scale2: Tensor, eps: Tensor,
                    state: LTQState) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """G-STE backward of LTQ (SPEC §1) in plain PyTorch: gradients of ``x, start, a, scale1, scale2``.

    Closed form instead of the reference's per-threshold graph; used where no kernel applies. The
    input ``x`` is saved alone: which interval each element falls in is recomputed here. Works on
    the contiguous permuted view of a channels_last (or otherwise densely permuted) ``x``, so that
    bucketize and the flattened sums need no copy, and returns ``grad_x`` in ``x``'s layout.
    """
    with torch.no_grad():
        return _ltq_grads_torch(grad_out, x, a.detach(), scale1.detach(), scale2.detach(), eps, state)


def _ltq_grads_torch(grad_out, x, a, scale1, scale2, eps, state: LTQState):
    order = memory_order(x)
    if order is not None:
        x = x.permute(order[0])
        grad_out = grad_out.permute(order[0])
    n = a.numel()
    xs = x * scale1
    a_pos, breakpoints, slope = state.a_pos, state.breakpoints, state.slope

    # Interval index k: 0 below d[0], k in 1..n for d[k-1] < xs <= d[k], n+1 above d[n].
    segment = _bucketize(xs, breakpoints)
    inside = (segment >= 1) & (segment <= n)
    seg0 = (segment - 1).clamp_(0, n - 1)

    # G-STE surrogate (SPEC §1, the paper's E[x̃^q], expectation of stochastic rounding):
    # g(xs) = interval / a⁺[k-1] * (xs - d[k-1]) + (k-1) * interval on interval k.
    grad_g = grad_out * scale2  # y = scale2 * g(xs) for the gradient
    grad_xs = torch.where(inside, grad_g * slope[seg0], grad_g.new_zeros(()))

    grad_x = grad_xs * scale1
    if order is not None:
        grad_x = grad_x.permute(order[1])
    grad_scale1 = (grad_xs * x).sum().reshape(1)

    # Per-interval sums W_k = Σ grad_xs and R_k = Σ grad_xs * (xs - d[k-1]).
    flat_seg = segment.reshape(-1)
    offset = (xs - breakpoints[seg0]).reshape(-1)
    flat_grad = grad_xs.reshape(-1)
    sum_w = flat_grad.new_zeros(n + 2).index_add_(0, flat_seg, flat_grad)[1 : n + 1]
    sum_r = flat_grad.new_zeros(n + 2).index_add_(0, flat_seg, flat_grad * offset)[1 : n + 1]
    # ∂g/∂start = -slope on every inner interval.
    grad_start = -sum_w.sum().reshape(1)
    # ∂g/∂a⁺[j]: -slope·(xs-d[j])/a⁺[j] on interval j+1; -slope on every later interval.
    later = sum_w.flip(0).cumsum(0).flip(0)  # later[j] = Σ_{k >= j} sum_w[k]
    later = torch.cat([later[1:], later.new_zeros(1)])
    grad_a_pos = -sum_r / a_pos - later
    grad_a = torch.where(a > eps, grad_a_pos, torch.zeros_like(grad_a_pos))

    # ∂y/∂scale2 = L[m], the forward level.
    codes = ltq_codes(xs, state.thresholds)
    grad_scale2 = (grad_out * state.levels[codes]).sum().reshape(1)
    return grad_x, grad_start, grad_a, grad_scale1, grad_scale2


class LTQ(nn.Module):
    """Learnable-threshold quantizer: non-uniform input thresholds, uniform outputs (SPEC §1).

    Forward (SPEC §1, the paper's x^q, Fig. 1b): ``xs = scale1·x``; with ``a⁺ = max(a, eps)`` the thresholds are the
    midpoints ``t`` of the learned intervals starting at ``start``; the output is
    ``scale2 · L[m]`` where ``m`` counts thresholds below ``xs`` and ``L`` is the uniform grid
    ``{0, 2/n, ..., 2}`` (n = 2^b - 1).

    Backward (G-STE, SPEC §1, the paper's E[x̃^q]): gradients of ``scale2 · g(scale1·x)``, the expectation of
    stochastic rounding over the learned intervals; ``∂y/∂scale2 = L[m]``.

    Args:
        n_bit: activation bit width, 1 to 8.

    State dict: ``start [1]``, ``a [n]``, ``scale1 [1]``, ``scale2 [1]`` (trained) and the
    constants ``two, one, zero, minusone, eps`` (buffers, never trained) — the reference names.
    """

    def __init__(self, n_bit: int):
        super().__init__()
        if not isinstance(n_bit, int) or not 1 <= n_bit <= 8:
            raise ValueError(f"LTQ: n_bit must be an integer in 1..8, got {n_bit!r}")
        self.n_bit = n_bit
        self.n_val = 2**n_bit - 1
        self.interval = 2.0 / self.n_val
        self.start = nn.Parameter(torch.tensor([0.0]))
        self.a = nn.Parameter(torch.full((self.n_val,), self.interval))
        self.scale1 = nn.Parameter(torch.tensor([1.0]))
        self.scale2 = nn.Parameter(torch.tensor([1.0]))
        # Constants kept only so the reference checkpoints load strictly.
        self.register_buffer("two", torch.tensor([2.0]))
        self.register_buffer("one", torch.tensor([1.0]))
        self.register_buffer("zero", torch.tensor([0.0]))
        self.register_buffer("minusone", torch.tensor([-1.0]))
        self.register_buffer("eps", torch.tensor([1e-3]))
        self.register_buffer("levels", ltq_level_table(self.n_val + 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return _LTQFunction.apply(x, self.start, self.a, self.scale1, self.scale2, self.eps, self.levels)

    @torch.no_grad()
    def thresholds(self) -> Tensor:
        """The forward thresholds ``t`` on the scaled input ``scale1·x`` (length n)."""
        a_pos = torch.where(self.a > self.eps, self.a, self.eps)
        return ltq_forward_thresholds(self.start, a_pos)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Integer output codes ``m`` in ``0..2^b-1`` (int64), so that ``forward(x) = L[m]·scale2``."""
        return ltq_codes(x * self.scale1, self.thresholds())

    def extra_repr(self) -> str:
        return f"n_bit={self.n_bit}"


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def weight_scale(weight: Tensor, n_bit: int) -> Tensor:
    """Per-output-channel scale ``s = gamma·mean|W|`` with ``gamma = (2^b-1)/2^(b-1)`` (SPEC §2).

    The L1-norm "entropy-preserving" scale of the paper's weight quantizer (Sec. 3.4): for a
    bell-shaped weight distribution it spreads the weights evenly over the 2^b levels. The mean is
    taken over the kernel width, height, then input channels, in that order. Detached.
    """
    gamma = (2**n_bit - 1) / 2 ** (n_bit - 1)
    w_abs = weight.detach().abs()
    mean = w_abs.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)
    return gamma * mean


def quantized_weight_value(weight: Tensor, s: Tensor, half: Tensor, steps: Tensor) -> Tensor:
    """The value of ``(Wq - Ws) + Ws`` of :meth:`HardQuantizeConv._quantize`, without autograd."""
    with torch.no_grad():
        w_scaled = weight / s
        w_clip = torch.where(w_scaled < half, w_scaled, half)
        w_clip = torch.where(w_clip > -half, w_clip, -half)
        w_quant = s * (torch.round((w_clip + half) * steps) / steps - half)
        return (w_quant - w_scaled) + w_scaled


def _cpu_autocast_bf16() -> bool:
    try:
        enabled, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except (TypeError, AttributeError):  # torch < 2.4
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return enabled and dtype == torch.bfloat16


def conv_needs_float32(x: Tensor, stride) -> bool:
    """Whether a convolution of ``x`` must run in float32 to get a correct backward.

    PyTorch's CPU bfloat16 ``convolution_backward`` returns garbage in the weight gradient of a 3×3,
    stride-2 convolution whose input is one pixel wide (tiny images reach ResNet's layer4 so; with
    16×16 images a third of the steps gave NaN). bfloat16 values are exact in float32, so the same
    products summed in float32 and rounded back give the bfloat16 result without the bug.
    """
    if x.device.type != "cpu" or x.dim() != 4 or min(x.shape[-2:]) != 1 or max(nn.modules.utils._pair(stride)) == 1:
        return False
    return x.dtype == torch.bfloat16 or _cpu_autocast_bf16()


class HardQuantizeConv(nn.Module):
    """Convolution with uniformly quantized, L1-scaled weights (SPEC §2, paper Sec. 3.4).

    ``Ws = W/s``; ``Wc = clamp(Ws, ±clip_val/2)``; ``Wq = s·(round((Wc + c/2)·nw)/nw - c/2)``
    with ``nw = (2^b-1)/c``; the conv uses ``(Wq - Ws).detach() + Ws`` (value Wq, gradient 1/s,
    no clipping mask). With ``clip_val = 2`` the levels are the odd multiples ``k·s/n``,
    ``k ∈ {-n, -n+2, ..., n}``.

    State dict (reference order): ``clip_val [1]``, ``zero [1]``, ``weight [out, in/groups, k, k]``.
    ``clip_val`` and ``zero`` are non-trainable parameters (``requires_grad=False``).
    """

    def __init__(
        self,
        in_chn: int,
        out_chn: int,
        num_bits: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        groups: int = 1,
    ):
        super().__init__()
        if not isinstance(num_bits, int) or not 1 <= num_bits <= 8:
            raise ValueError(f"HardQuantizeConv: num_bits must be an integer in 1..8, got {num_bits!r}")
        if in_chn % groups or out_chn % groups:
            raise ValueError(f"HardQuantizeConv: channels {in_chn}->{out_chn} not divisible by groups={groups}")
        self.in_chn, self.out_chn = in_chn, out_chn
        self.num_bits = num_bits
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self.shape = (out_chn, in_chn // groups, kernel_size, kernel_size)
        self.clip_val = nn.Parameter(torch.tensor([2.0]), requires_grad=False)
        self.zero = nn.Parameter(torch.tensor([0.0]), requires_grad=False)
        self.weight = nn.Parameter((torch.rand(self.shape) - 0.5) * 0.001)

    def _quantize(self) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(Ws, Wq, s)`` — normalised latent weight, quantized weight, per-channel scale."""
        s = weight_scale(self.weight, self.num_bits)
        w_scaled = self.weight / s
        half = self.clip_val / 2
        w_clip = torch.where(w_scaled < half, w_scaled, half)
        w_clip = torch.where(w_clip > -half, w_clip, -half)
        steps = (2**self.num_bits - 1) / self.clip_val
        w_quant = s * (torch.round((w_clip + half) * steps) / steps - half)
        return w_scaled, w_quant, s

    def quantized_weight(self) -> Tensor:
        """The conv weight actually used in forward: value Wq, gradient ``1/s`` (SPEC §2)."""
        if get_backend() != "torch" and self.weight.device.type == "cpu" and self.weight.dtype == torch.float32:
            # One C pass on CPU (n2uq::weight_ste: the same value, gradient 1/s).
            s = weight_scale(self.weight, self.num_bits)
            steps = (2**self.num_bits - 1) / self.clip_val
            return weight_ste(self.weight, s, self.clip_val / 2, steps)
        w_scaled, w_quant, _ = self._quantize()
        return (w_quant.detach() - w_scaled.detach()) + w_scaled

    @torch.no_grad()
    def weight_codes(self) -> tuple[Tensor, Tensor]:
        """Integer weight codes and scale: ``Wq = codes · (s / n)`` with odd ``codes`` in ``[-n, n]``.

        Returns ``(codes int64 [out, in/g, k, k], step float [out])`` where ``step = s / n``.
        Assumes ``clip_val = 2`` (the value every released model uses).
        """
        n = 2**self.num_bits - 1
        s = weight_scale(self.weight, self.num_bits)
        w_scaled = self.weight / s
        half = self.clip_val / 2
        w_clip = torch.where(w_scaled < half, w_scaled, half)
        w_clip = torch.where(w_clip > -half, w_clip, -half)
        steps = n / self.clip_val
        level = torch.round((w_clip + half) * steps)  # 0..n
        return (2 * level - n).to(torch.int64), (s / n).reshape(-1)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.quantized_weight()
        if conv_needs_float32(x, self.stride):
            with torch.autocast("cpu", enabled=False):
                out = F.conv2d(x.to(torch.bfloat16).float(), weight.to(torch.bfloat16).float(), None, self.stride,
                               self.padding, 1, self.groups)
            return out.to(torch.bfloat16)
        return F.conv2d(x, weight, None, self.stride, self.padding, 1, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_chn}, {self.out_chn}, num_bits={self.num_bits}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}"
        )


# ---------------------------------------------------------------------------------------------
# PACT and LearnableBias
# ---------------------------------------------------------------------------------------------


class PACT(nn.Module):
    """PACT activation quantizer (SPEC §3), used before MobileNetV2's last 1×1 conv.

    ``x = clip(relu(x), c)``; ``y = round(x·nq)/nq + x - x.detach()`` with ``nq = (2^b-1)/c``.
    Plain autograd of exactly that expression: ``x`` gets gradient where ``0 < x < c``; ``c`` gets
    the clipped elements' gradient plus ``Σ grad·round(x·nq)/(2^b-1)``.
    """

    def __init__(self, num_bits: int, init_act_clip_val: float = 2):
        super().__init__()
        if not isinstance(num_bits, int) or not 1 <= num_bits <= 8:
            raise ValueError(f"PACT: num_bits must be an integer in 1..8, got {num_bits!r}")
        self.num_bits = num_bits
        self.clip_val = nn.Parameter(torch.tensor([float(init_act_clip_val)]))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        x = torch.where(x < self.clip_val, x, self.clip_val)
        steps = (2**self.num_bits - 1) / self.clip_val
        return torch.round(x * steps) / steps + x - x.detach()

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Integer codes ``round(clip(relu(x), c)·nq)`` in ``0..2^b-1``."""
        x = F.relu(x)
        x = torch.where(x < self.clip_val, x, self.clip_val)
        return torch.round(x * ((2**self.num_bits - 1) / self.clip_val)).to(torch.int64)

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}"


class LearnableBias(nn.Module):
    """``y = x + bias`` with a per-channel learnable ``bias [1, C, 1, 1]`` (SPEC §4).

    ``LearnableBias → PReLU → LearnableBias`` is the paper's "RPReLU" before each quantizer.
    """

    def __init__(self, out_chn: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, out_chn, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias.expand_as(x)


# The operators (registered with torch.library) use the helpers above.
from n2uq.kernels.ops import ltq_stage, weight_ste  # noqa: E402
