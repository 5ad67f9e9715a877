"""Triton kernels for CUDA: the same operations as ``cpu_kernels.c`` (docs/SPEC.md: activation quantizer, RPReLU).

Importable without Triton or a GPU (``supports`` is then always False). A tensor is seen as
``[N, C, S]`` (``S = H·W``) in NCHW or channels_last layout; each program handles a tile of
``BLOCK_C`` channels × ``BLOCK_S`` positions of one image. Per-channel and per-interval partial
sums go to one row per program and are reduced by ``torch.sum`` in float64 over a fixed-shape
buffer — deterministic, no atomics. Values are computed in float32 from float32, bfloat16 or
float16 inputs, exactly as PyTorch promotes them (the parameters are float32).

Grid: axis 0 runs over (image, position block) pairs and axis 2 over channel blocks, so the batch
is not bound by CUDA's 65535 limit of axes 1 and 2; element offsets are computed in int64 (no
overflow past 2^31 elements). LTQ with more than 15 thresholds (5 to 8 bits) is left to the plain
PyTorch path: the backward unrolls one pair of reductions per interval.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from n2uq.kernels.op_utils import ChainSums, LTQSums, chain_sums_from_buffer, ltq_sums_from_buffer

try:  # pragma: no cover - depends on the machine
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "MAX_THRESHOLDS", "supports", "state_supported", "ltq_state", "ltq_forward",
           "ltq_backward", "rprelu_forward", "rprelu_backward", "decode"]

#: Thresholds (2^b - 1) of the largest LTQ these kernels take; larger ones use plain PyTorch.
MAX_THRESHOLDS = 15

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _layout(x: Tensor) -> Optional[bool]:
    """False: contiguous NCHW (or any contiguous tensor); True: channels_last; None: neither."""
    if x.is_contiguous():
        return False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return True
    return None


def supports(x: Tensor, dtype: torch.dtype) -> bool:
    return (HAS_TRITON and x.is_cuda and dtype == torch.float32 and x.dtype in _INPUT_DTYPES
            and _layout(x) is not None and x.numel() > 0)


def _geometry(x: Tensor, per_channel: bool):
    """(N, C, S, channels_last, BLOCK_C, BLOCK_S) for the tiled kernels.

    NCHW tiles are [BLOCK_C, BLOCK_S] (positions contiguous), channels_last tiles [BLOCK_S, BLOCK_C]
    (channels contiguous): the last tile axis is the contiguous one in memory, so every warp reads
    consecutive addresses. Few distinct block sizes, so that few kernel variants are compiled.
    """
    if not per_channel or x.dim() < 2:
        return 1, 1, x.numel(), False, 1, 1024
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    if _layout(x):
        block_c = min(max(triton.next_power_of_2(c), 16), 64)
        return n, c, s, True, block_c, 1024 // block_c
    return n, c, s, False, 4, 256 if s > 64 else 64


if HAS_TRITON:

    @triton.jit
    def _tile(pid, n_sblocks, pid_c, C, S, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_S: tl.constexpr):
        """Channels, int64 element offsets and mask of program (pid = image * n_sblocks + block, pid_c)."""
        pid_n = (pid // n_sblocks).to(tl.int64)
        pid_s = (pid % n_sblocks).to(tl.int64)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        base = pid_n * S * C
        if CHANNELS_LAST:  # [BLOCK_S, BLOCK_C]
            offs = base + s[:, None] * C + c[None, :].to(tl.int64)
            mask = (s[:, None] < S) & (c[None, :] < C)
        else:  # [BLOCK_C, BLOCK_S]
            offs = base + c[:, None].to(tl.int64) * S + s[None, :]
            mask = (c[:, None] < C) & (s[None, :] < S)
        return c, offs, mask

    @triton.jit
    def _per_channel(ptr, c, C, CHANNELS_LAST: tl.constexpr):
        """A per-channel parameter broadcast over the tile's positions."""
        v = tl.load(ptr + c, mask=c < C, other=0.0)
        if CHANNELS_LAST:
            out = v[None, :]
        else:
            out = v[:, None]
        return out

    @triton.jit
    def _channel_sum(t, CHANNELS_LAST: tl.constexpr):
        """Sum of a tile over its positions: one value per channel."""
        if CHANNELS_LAST:
            out = tl.sum(t, axis=0)
        else:
            out = tl.sum(t, axis=1)
        return out

    @triton.jit
    def _chain(x, c, C, b1_ptr, w_ptr, b2_ptr, CHAIN: tl.constexpr, CHANNELS_LAST: tl.constexpr):
        """(z1, z2): z1 = x + b1, z2 = prelu(z1, w) + b2 (or x, x without the chain)."""
        if CHAIN:
            z1 = x + _per_channel(b1_ptr, c, C, CHANNELS_LAST)
            z2 = tl.where(z1 > 0, z1, _per_channel(w_ptr, c, C, CHANNELS_LAST) * z1)
            z2 = z2 + _per_channel(b2_ptr, c, C, CHANNELS_LAST)
        else:
            z1 = x
            z2 = x
        return z1, z2

    @triton.jit
    def _ltq_fwd_kernel(x_ptr, y_ptr, codes_ptr, b1_ptr, w_ptr, b2_ptr, s1_ptr, thr_ptr, table_ptr, C, S,
                        n_sblocks, N_THR: tl.constexpr, CHAIN: tl.constexpr, WRITE_CODES: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        c, offs, mask = _tile(tl.program_id(0), n_sblocks, tl.program_id(2), C, S, CHANNELS_LAST, BLOCK_C,
                              BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, z2 = _chain(x, c, C, b1_ptr, w_ptr, b2_ptr, CHAIN, CHANNELS_LAST)
        xs = z2 * tl.load(s1_ptr)
        y = tl.zeros_like(xs) + tl.load(table_ptr)
        m = tl.zeros(xs.shape, dtype=tl.int32)
        for j in tl.static_range(N_THR):
            gt = xs > tl.load(thr_ptr + j)
            y = tl.where(gt, tl.load(table_ptr + j + 1), y)
            m += gt.to(tl.int32)
        tl.store(y_ptr + offs, y, mask=mask)
        if WRITE_CODES:
            tl.store(codes_ptr + offs, m.to(tl.uint8), mask=mask)

    @triton.jit
    def _ltq_bwd_kernel(x_ptr, g_ptr, gx_ptr, b1_ptr, w_ptr, b2_ptr, s1_ptr, s2_ptr, thr_ptr, lev_ptr, d_ptr,
                        slope_ptr, part_ptr, chpart_ptr, C, S, n_sblocks,
                        N_THR: tl.constexpr, CHAIN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        pid, pid_c = tl.program_id(0), tl.program_id(2)
        c, offs, mask = _tile(pid, n_sblocks, pid_c, C, S, CHANNELS_LAST, BLOCK_C, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z1, z2 = _chain(x, c, C, b1_ptr, w_ptr, b2_ptr, CHAIN, CHANNELS_LAST)
        s1 = tl.load(s1_ptr)
        xs = z2 * s1
        k = tl.zeros(xs.shape, dtype=tl.int32)
        sl = tl.zeros_like(xs)
        dl = tl.zeros_like(xs)
        lm = tl.zeros_like(xs) + tl.load(lev_ptr)
        for j in tl.static_range(N_THR):
            gt = xs > tl.load(d_ptr + j)
            k += gt.to(tl.int32)
            sl = tl.where(gt, tl.load(slope_ptr + j), sl)
            dl = tl.where(gt, tl.load(d_ptr + j), dl)
            lm = tl.where(xs > tl.load(thr_ptr + j), tl.load(lev_ptr + j + 1), lm)
        inside = (k >= 1) & ~(xs > tl.load(d_ptr + N_THR))
        gxs = tl.where(inside, (g * tl.load(s2_ptr)) * sl, 0.0)
        g2 = gxs * s1
        row = pid.to(tl.int64) * tl.num_programs(2) + pid_c
        base = part_ptr + row * (2 * N_THR + 2)
        go = g * (xs - dl)
        for j in tl.static_range(N_THR):
            in_j = inside & (k == j + 1)
            tl.store(base + j, tl.sum(tl.sum(tl.where(in_j, g, 0.0), axis=1), axis=0))
            tl.store(base + N_THR + j, tl.sum(tl.sum(tl.where(in_j, go, 0.0), axis=1), axis=0))
        tl.store(base + 2 * N_THR, tl.sum(tl.sum(gxs * z2, axis=1), axis=0))
        tl.store(base + 2 * N_THR + 1, tl.sum(tl.sum(g * lm, axis=1), axis=0))
        if CHAIN:
            pos = z1 > 0
            g1 = tl.where(pos, g2, _per_channel(w_ptr, c, C, CHANNELS_LAST) * g2)
            tl.store(gx_ptr + offs, g1.to(gx_ptr.dtype.element_ty), mask=mask)
            crow = chpart_ptr + pid.to(tl.int64) * 3 * C
            cmask = c < C
            tl.store(crow + c, _channel_sum(g2, CHANNELS_LAST), mask=cmask)
            tl.store(crow + C + c, _channel_sum(tl.where(pos, 0.0, z1 * g2), CHANNELS_LAST), mask=cmask)
            tl.store(crow + 2 * C + c, _channel_sum(g1, CHANNELS_LAST), mask=cmask)
        else:
            tl.store(gx_ptr + offs, g2.to(gx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rprelu_fwd_kernel(a_ptr, r_ptr, y_ptr, z_ptr, b1_ptr, w_ptr, b2_ptr, C, S, n_sblocks,
                           HAS_RES: tl.constexpr, WRITE_Z: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        c, offs, mask = _tile(tl.program_id(0), n_sblocks, tl.program_id(2), C, S, CHANNELS_LAST, BLOCK_C,
                              BLOCK_S)
        v = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            v = v + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = v + _per_channel(b1_ptr, c, C, CHANNELS_LAST)
        y = tl.where(v > 0, v, _per_channel(w_ptr, c, C, CHANNELS_LAST) * v) + _per_channel(b2_ptr, c, C,
                                                                                            CHANNELS_LAST)
        if WRITE_Z:
            tl.store(z_ptr + offs, v, mask=mask)
        tl.store(y_ptr + offs, y, mask=mask)

    @triton.jit
    def _rprelu_bwd_kernel(g_ptr, z_ptr, gx_ptr, w_ptr, chpart_ptr, C, S, n_sblocks,
                           CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        c, offs, mask = _tile(pid, n_sblocks, tl.program_id(2), C, S, CHANNELS_LAST, BLOCK_C, BLOCK_S)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(z_ptr + offs, mask=mask, other=0.0)
        pos = v > 0
        g1 = tl.where(pos, g, _per_channel(w_ptr, c, C, CHANNELS_LAST) * g)
        tl.store(gx_ptr + offs, g1, mask=mask)
        crow = chpart_ptr + pid.to(tl.int64) * 3 * C
        cmask = c < C
        tl.store(crow + c, _channel_sum(g, CHANNELS_LAST), mask=cmask)
        tl.store(crow + C + c, _channel_sum(tl.where(pos, 0.0, v * g), CHANNELS_LAST), mask=cmask)
        tl.store(crow + 2 * C + c, _channel_sum(g1, CHANNELS_LAST), mask=cmask)

    @triton.jit
    def _state_kernel(start_ptr, a_ptr, eps_ptr, s2_ptr, lev_ptr, out_ptr, two_over_n, N: tl.constexpr):
        """LTQ state in one program: the float32 operations of the definitions ``n2uq.quant.ltq_forward_thresholds``,
        ``ltq_breakpoints`` and ``gste_slopes``, in their order, transcribed for the device (a host copy of
        the parameters would cost a synchronisation per call); tests/test_kernels_gpu.py holds it to them bit
        for bit. out = [a⁺ (N), thresholds (N), breakpoints (N+1), slopes (N), table (N+1)]."""
        eps = tl.load(eps_ptr)
        start = tl.load(start_ptr)
        s2 = tl.load(s2_ptr)
        d = start
        tl.store(out_ptr + 2 * N, d)
        t = start
        h_prev = start
        for i in tl.static_range(N):
            a = tl.load(a_ptr + i)
            ap = tl.where(a > eps, a, eps)
            h = ap * 0.5  # a⁺ / 2, exact
            if i == 0:
                t = start + h
            else:
                t = t + (h_prev + h)
            d = d + ap
            tl.store(out_ptr + i, ap)
            tl.store(out_ptr + N + i, t)
            tl.store(out_ptr + 2 * N + 1 + i, d)
            tl.store(out_ptr + 3 * N + 1 + i, tl.math.div_rn(1.0, ap) * two_over_n)  # reciprocal, then scale
            h_prev = h
        for i in tl.static_range(N + 1):
            tl.store(out_ptr + 4 * N + 1 + i, tl.load(lev_ptr + i) * s2)

    @triton.jit
    def _decode_kernel(codes_ptr, y_ptr, table_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        codes = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        tl.store(y_ptr + offs, tl.load(table_ptr + codes, mask=mask, other=0.0), mask=mask)


def state_supported(a: Tensor, dtype: torch.dtype, *others: Tensor) -> bool:
    """Whether :func:`ltq_state` applies to an LTQ with intervals ``a`` and the
    other parameter tensors: CUDA, float32 throughout, at most 15 thresholds."""
    return (HAS_TRITON and a.is_cuda and dtype == torch.float32 and a.numel() <= MAX_THRESHOLDS
            and all(t.dtype == torch.float32 and t.is_cuda for t in (a, *others)))


def ltq_state(start: Tensor, a: Tensor, eps: Tensor, scale2: Tensor, levels: Tensor):
    """``(a⁺, thresholds, breakpoints, slopes, table)`` in one launch instead of ~2n+10 tiny ops."""
    n = a.numel()
    out = torch.empty(5 * n + 2, device=a.device, dtype=torch.float32)
    _state_kernel[(1,)](start.detach(), a.detach(), eps, scale2.detach(), levels, out,
                        float(np.float32(2.0 / n)), N=n)
    return out.split([n, n, n + 1, n, n + 1])


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in the memory layout of ``x`` (the kernels index both with the same offsets)."""
    return t.contiguous(memory_format=torch.channels_last) if _layout(x) else t.contiguous()


def _grid(n: int, c: int, s: int, block_c: int, block_s: int):
    """(images × position blocks, 1, channel blocks): the long axis first (CUDA allows 2^31-1 there,
    65535 on the others), and the number of position blocks per image."""
    n_sblocks = triton.cdiv(s, block_s)
    return (n * n_sblocks, 1, triton.cdiv(c, block_c)), n_sblocks


def _scalar(t: Tensor) -> Tensor:
    return t.detach().reshape(1).float()


def ltq_forward(x: Tensor, chain, scale1: Tensor, thresholds: Tensor, table: Tensor, want_codes: bool,
                out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Optional[Tensor]]:
    """``y = table[m]`` (stored as ``out_dtype``: one rounding, as ``.to(out_dtype)`` would do) and codes."""
    n, c, s, cl, bc, bs = _geometry(x, chain is not None)
    y = torch.empty_like(x, dtype=out_dtype)
    codes = torch.empty_like(x, dtype=torch.uint8) if want_codes else None
    b1, w, b2 = chain if chain is not None else (y, y, y)  # unused pointers without the chain
    grid, n_sblocks = _grid(n, c, s, bc, bs)
    _ltq_fwd_kernel[grid](
        x, y, codes if codes is not None else y, b1, w, b2, _scalar(scale1), thresholds, table, c, s, n_sblocks,
        N_THR=thresholds.numel(), CHAIN=chain is not None, WRITE_CODES=want_codes, CHANNELS_LAST=cl,
        BLOCK_C=bc, BLOCK_S=bs)
    return y, codes


def ltq_backward(x: Tensor, grad: Tensor, chain, scale1: Tensor, scale2: Tensor, thresholds: Tensor,
                 levels: Tensor, breakpoints: Tensor, slope: Tensor) -> tuple[Tensor, LTQSums]:
    """Input gradient and the sums G-STE needs (see :mod:`n2uq.kernels.torch_ops`), named."""
    n, c, s, cl, bc, bs = _geometry(x, chain is not None)
    grad = _like(grad, x)
    gx = torch.empty_like(x)
    grid, n_sblocks = _grid(n, c, s, bc, bs)
    n_thr = thresholds.numel()
    part = torch.empty(grid[0] * grid[2], 2 * n_thr + 2, device=x.device, dtype=torch.float32)
    chpart = torch.empty(grid[0], 3 * c if chain is not None else 1, device=x.device, dtype=torch.float32)
    b1, w, b2 = chain if chain is not None else (part, part, part)
    _ltq_bwd_kernel[grid](
        x, grad, gx, b1, w, b2, _scalar(scale1), _scalar(scale2), thresholds, levels, breakpoints, slope,
        part, chpart, c, s, n_sblocks, N_THR=n_thr, CHAIN=chain is not None, CHANNELS_LAST=cl, BLOCK_C=bc,
        BLOCK_S=bs)
    sums = part.sum(0, dtype=torch.float64)  # fixed shape and order: deterministic, no atomics
    if chain is not None:
        sums = torch.cat([sums, chpart.sum(0, dtype=torch.float64)])
    return gx, ltq_sums_from_buffer(sums, n_thr, c if chain is not None else None)


def rprelu_forward(a: Tensor, residual: Optional[Tensor], chain,
                   want_z: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``y = prelu((a + residual) + b1, w) + b2`` and, if wanted (for backward), ``z = (a + residual) + b1``."""
    n, c, s, cl, bc, bs = _geometry(a, True)
    y = torch.empty_like(a, dtype=torch.float32)
    z = torch.empty_like(a, dtype=torch.float32) if want_z else None
    b1, w, b2 = chain
    grid, n_sblocks = _grid(n, c, s, bc, bs)
    _rprelu_fwd_kernel[grid](
        a, residual if residual is not None else a, y, z if want_z else y, b1, w, b2, c, s, n_sblocks,
        HAS_RES=residual is not None, WRITE_Z=want_z, CHANNELS_LAST=cl, BLOCK_C=bc, BLOCK_S=bs)
    return y, z


def rprelu_backward(grad: Tensor, z: Tensor, weight: Tensor) -> tuple[Tensor, ChainSums]:
    """Input gradient and the float64 per-channel sums of the parameters' gradients, named."""
    n, c, s, cl, bc, bs = _geometry(z, True)
    grad = _like(grad, z)
    gx = torch.empty_like(z)
    grid, n_sblocks = _grid(n, c, s, bc, bs)
    chpart = torch.empty(grid[0], 3 * c, device=z.device, dtype=torch.float32)
    _rprelu_bwd_kernel[grid](grad, z, gx, weight, chpart, c, s, n_sblocks, CHANNELS_LAST=cl, BLOCK_C=bc,
                             BLOCK_S=bs)
    return gx, chain_sums_from_buffer(chpart.sum(0, dtype=torch.float64), c)


def decode(codes: Tensor, table: Tensor) -> Tensor:
    y = torch.empty_like(codes, dtype=table.dtype)
    numel = codes.numel()
    _decode_kernel[(triton.cdiv(numel, 1024),)](codes, y, table, numel, BLOCK=1024)
    return y
