"""Building blocks shared by the N2UQ architectures, registered under the names of the authors' code.

Every quantized convolution of N2UQ sits in a *stage*: ``RPReLU → LTQ → HardQuantizeConv → BN``,
where RPReLU is ``LearnableBias → PReLU → LearnableBias``. Stage ``i`` of a block owns the
submodules ``bias{i}1, prelu{i}, bias{i}2, quan{i}, conv{i}, bn{i}`` (the names of the released
checkpoints), registered in that order. Models build and run stages only through these functions,
which hand them to :mod:`n2uq.kernels`: a fused operator, or (``N2UQ_KERNELS=reference``) the
modules one by one — the models never see which.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from n2uq.kernels import quant_stage, rprelu
from n2uq.methods import Quantizers
from n2uq.quant import LearnableBias

__all__ = ["add_rprelu", "add_quant_stage", "run_quant_stage", "run_rprelu", "quantized_shortcut",
           "run_shortcut"]


def add_rprelu(block: nn.Module, index: int, channels: int) -> None:
    """Register RPReLU ``index`` on ``block``: ``bias{index}1``, ``prelu{index}``, ``bias{index}2``."""
    block.add_module(f"bias{index}1", LearnableBias(channels))
    block.add_module(f"prelu{index}", nn.PReLU(channels))
    block.add_module(f"bias{index}2", LearnableBias(channels))


def add_quant_stage(block: nn.Module, index: int, in_chn: int, out_chn: int, quantizers: Quantizers,
                    kernel_size: int, stride: int = 1, groups: int = 1) -> None:
    """Register stage ``index``: RPReLU, ``quan{index}`` (LTQ for N2UQ), ``conv{index}`` (padding
    ``k // 2``; HardQuantizeConv for N2UQ), ``bn{index}``."""
    add_rprelu(block, index, in_chn)
    block.add_module(f"quan{index}", quantizers.activation())
    block.add_module(f"conv{index}", quantizers.conv(in_chn, out_chn, kernel_size, stride, kernel_size // 2, groups))
    block.add_module(f"bn{index}", nn.BatchNorm2d(out_chn))


def run_quant_stage(block: nn.Module, index: int, x: Tensor) -> Tensor:
    """``bn(conv(quan(bias2(prelu(bias1(x))))))`` of stage ``index``."""
    m = block._modules
    out = quant_stage(x, m[f"bias{index}1"], m[f"prelu{index}"], m[f"bias{index}2"], m[f"quan{index}"],
                      m[f"conv{index}"])
    return m[f"bn{index}"](out)


def run_rprelu(block: nn.Module, index: int, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """RPReLU ``index`` of ``x + residual`` (the block output)."""
    m = block._modules
    return rprelu(x, m[f"bias{index}1"], m[f"prelu{index}"], m[f"bias{index}2"], residual=residual)


def quantized_shortcut(in_chn: int, out_chn: int, quantizers: Quantizers, stride: int) -> nn.Sequential:
    """The quantized 1×1 shortcut ``LTQ → HardQuantizeConv → BN`` (keys ``downsample.0/1/2``)."""
    return nn.Sequential(quantizers.activation(), quantizers.conv(in_chn, out_chn, 1, stride, 0),
                         nn.BatchNorm2d(out_chn))


def run_shortcut(shortcut: Optional[nn.Module], x: Tensor) -> Tensor:
    """``shortcut(x)`` (identity when ``None``); a :func:`quantized_shortcut` runs as one stage."""
    if shortcut is None:
        return x
    if isinstance(shortcut, nn.Sequential) and len(shortcut) == 3:
        return shortcut[2](quant_stage(x, None, None, None, shortcut[0], shortcut[1]))
    return shortcut(x)
