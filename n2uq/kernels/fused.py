"""The entry points the blocks call: one quantized stage, the block-output RPReLU, a plain LTQ.

A quantized stage of every N2UQ block is ``LearnableBias → PReLU → LearnableBias → LTQ →
HardQuantizeConv``. Run module by module, autograd keeps three full-size tensors per stage alive
for backward (the PReLU input, the LTQ input and the conv input) and sweeps memory ~10 times.
:func:`quant_stage` computes the same values with two operators:

* ``n2uq::ltq_stage`` (:mod:`n2uq.kernels.ltq_op`): RPReLU and LTQ in one pass, saving only the
  stage input;
* ``_CodesConv``: the convolution saves its input as uint8 LTQ codes instead of float: the LTQ
  output is exactly ``table[code]``, so backward rebuilds it bit for bit (4× less memory).

:func:`rprelu` fuses the block-output RPReLU with the residual add (saves one tensor, as the PReLU
alone would, in one pass instead of four).

With ``N2UQ_KERNELS=reference`` (:func:`n2uq.kernels.select.fused` false) every function here calls
the modules one by one, i.e. the definitions of :mod:`n2uq.quant`; so they do when a submodule is a
subclass or has hooks (whatever it does then is honoured). Otherwise forward values are
bit-identical to the module-by-module computation and gradients agree to float rounding
(``tests/test_backends.py``, ``tests/test_fused.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from n2uq.kernels import modules, select
from n2uq.kernels.block_ops import decode_codes, weight_ste
from n2uq.kernels.block_ops import rprelu as fused_rprelu
from n2uq.kernels.ltq_op import ltq_stage
from n2uq.numerics import conv2d, conv_needs_float32
from n2uq.quant import LTQ, HardQuantizeConv, LearnableBias

__all__ = ["quant_stage", "rprelu", "ltq", "stage_output"]


#: The classes the fused operators stand in for: each definition and its fast module (``n2uq.LTQ``).
_FUSABLE = {LTQ: (LTQ, modules.LTQ), HardQuantizeConv: (HardQuantizeConv, modules.HardQuantizeConv),
            LearnableBias: (LearnableBias,), nn.PReLU: (nn.PReLU,)}


def _plain(module: Optional[nn.Module], kind: type) -> bool:
    """Exactly ``kind`` or its fast module (not another subclass) and without hooks, so skipping its
    forward is invisible."""
    if module is None:
        return True
    if type(module) not in _FUSABLE[kind]:
        return False
    return not any(getattr(module, name, None) for name in ("_forward_hooks", "_forward_pre_hooks"))


class _CodesConv(torch.autograd.Function):
    """``conv2d(y, weight)`` where ``y = table[codes]``; saves ``codes`` (uint8) instead of ``y``."""

    @staticmethod
    def forward(ctx, y, codes, table, weight, stride, padding, groups):  # type: ignore[override]
        out = F.conv2d(y, weight, None, stride, padding, 1, groups)
        ctx.save_for_backward(codes, table, weight)
        ctx.conf = (stride, padding, groups, y.dtype, out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        codes, table, weight = ctx.saved_tensors
        stride, padding, groups, y_dtype, conv_dtype = ctx.conf
        # Under autocast the forward ran the conv in `conv_dtype`; rebuild exactly what it used.
        y = decode_codes(codes, table).to(conv_dtype)
        need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        stride, padding = list(F._pair(stride)), list(F._pair(padding))
        w, g = weight.to(conv_dtype), grad.to(conv_dtype)
        if conv_needs_float32(y, stride):  # a PyTorch CPU bfloat16 bug, see n2uq.numerics
            y, w, g = y.float(), w.float(), g.float()
        g_y, g_w, _ = torch.ops.aten.convolution_backward(
            g, y, w, None, stride, padding, [1, 1], False, [0, 0], groups, [need_y, need_w, False])
        g_y = g_y.to(y_dtype) if need_y else None
        g_w = g_w.to(weight.dtype) if need_w else None
        return g_y, None, None, g_w, None, None, None


def quant_stage(x: Tensor, bias1: Optional[LearnableBias], prelu: Optional[nn.PReLU],
                bias2: Optional[LearnableBias], quan: LTQ, conv: HardQuantizeConv) -> Tensor:
    """``conv(quan(bias2(prelu(bias1(x)))))`` (chain modules may be ``None``: ``conv(quan(x))``).

    Fused (see the module docstring) when the modules are the plain N2UQ ones; else module by module.
    """
    chain = (bias1, prelu, bias2)
    fusable = (select.fused() and x.dim() == 4
               and _plain(bias1, LearnableBias) and _plain(prelu, nn.PReLU) and _plain(bias2, LearnableBias)
               and _plain(quan, LTQ) and _plain(conv, HardQuantizeConv)
               and (all(m is None for m in chain) or all(m is not None for m in chain)))
    if not fusable:
        for module in chain:
            if module is not None:
                x = module(x)
        return conv(quan(x))
    y, codes, table = stage_output(x, bias1, prelu, bias2, quan, torch.is_grad_enabled(), _conv_input_code(x))
    weight = weight_ste(conv.weight, conv.clip_val, conv.n_bit)
    if codes is None:
        return conv2d(y, weight, conv.stride, conv.padding, conv.groups)
    return _CodesConv.apply(y, codes, table, weight, conv.stride, conv.padding, conv.groups)


def _conv_input_code(x: Tensor) -> int:
    """Under CUDA autocast the convolution would cast the stage output to bf16/fp16 anyway: the stage
    writes it in that dtype directly (``out_code`` of :func:`n2uq.kernels.ltq_op.ltq_stage`)."""
    if not (x.is_cuda and torch.is_autocast_enabled()):
        return 0
    dtype = torch.get_autocast_dtype("cuda") if hasattr(torch, "get_autocast_dtype") else torch.get_autocast_gpu_dtype()
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


def stage_output(x: Tensor, bias1: Optional[LearnableBias], prelu: Optional[nn.PReLU],
                 bias2: Optional[LearnableBias], quan: LTQ, want_codes: bool = False, out_code: int = 0):
    """``(quan(bias2(prelu(bias1(x)))), uint8 codes or None, level table)`` in one fused operator."""
    b1 = bias1.bias if bias1 is not None else None
    w = prelu.weight if prelu is not None else None
    b2 = bias2.bias if bias2 is not None else None
    return ltq_stage(x, b1, w, b2, quan.start, quan.a, quan.scale1, quan.scale2, quan.eps, quan.levels,
                     want_codes, out_code)


def ltq(quan: LTQ, x: Tensor) -> Tensor:
    """``quan(x)`` through the fused operator (one pass, saves only ``x``), or the module itself
    under ``N2UQ_KERNELS=reference`` or when it is a subclass or has hooks."""
    if not (select.fused() and _plain(quan, LTQ)):
        return quan(x)
    return stage_output(x, None, None, None, quan)[0]


def rprelu(x: Tensor, bias1: LearnableBias, prelu: nn.PReLU, bias2: LearnableBias,
           residual: Optional[Tensor] = None) -> Tensor:
    """``bias2(prelu(bias1(x + residual)))`` — the block-output RPReLU — fused.

    Module by module under ``reference`` and ``torch`` (nothing to gain from fusing in plain
    PyTorch), for other than 4-d inputs, and when a submodule is not the plain one."""
    if (select.get_backend() in ("reference", "torch") or x.dim() != 4
            or not (_plain(bias1, LearnableBias) and _plain(prelu, nn.PReLU) and _plain(bias2, LearnableBias))):
        return bias2(prelu(bias1(x if residual is None else x + residual)))
    return fused_rprelu(x, residual, bias1.bias, prelu.weight, bias2.bias)
