"""Building blocks shared by the N2UQ architectures, registered under the reference's names.

Every quantized convolution of N2UQ sits in a *stage*: ``RPReLU → LTQ → HardQuantizeConv → BN``,
where RPReLU is ``LearnableBias → PReLU → LearnableBias``. Stage ``i`` of a block owns the
submodules ``bias{i}1, prelu{i}, bias{i}2, quan{i}, conv{i}, bn{i}`` (the names of the released
checkpoints, SPEC §5), registered in that order. Running a stage goes through the fused operator
of :mod:`n2uq.kernels.fused`, which computes exactly what the modules compute one by one.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from n2uq.kernels.fused import quant_stage, rprelu
from n2uq.quant import LTQ, HardQuantizeConv, LearnableBias

__all__ = ["add_rprelu", "add_quant_stage", "run_quant_stage", "run_rprelu"]


def add_rprelu(block: nn.Module, index: int, channels: int) -> None:
    """Register RPReLU ``index`` on ``block``: ``bias{index}1``, ``prelu{index}``, ``bias{index}2``."""
    block.add_module(f"bias{index}1", LearnableBias(channels))
    block.add_module(f"prelu{index}", nn.PReLU(channels))
    block.add_module(f"bias{index}2", LearnableBias(channels))


def add_quant_stage(block: nn.Module, index: int, in_chn: int, out_chn: int, n_bit: int, kernel_size: int,
                    stride: int = 1, groups: int = 1) -> None:
    """Register stage ``index``: RPReLU, ``quan{index}`` (LTQ), ``conv{index}`` (padding ``k // 2``), ``bn{index}``."""
    add_rprelu(block, index, in_chn)
    block.add_module(f"quan{index}", LTQ(n_bit))
    block.add_module(f"conv{index}", HardQuantizeConv(in_chn, out_chn, n_bit, kernel_size, stride,
                                                      kernel_size // 2, groups))
    block.add_module(f"bn{index}", nn.BatchNorm2d(out_chn))


def run_quant_stage(block: nn.Module, index: int, x: Tensor) -> Tensor:
    """``bn(conv(quan(bias2(prelu(bias1(x))))))`` of stage ``index``, as one fused operator + BN."""
    m = block._modules
    out = quant_stage(x, m[f"bias{index}1"], m[f"prelu{index}"], m[f"bias{index}2"], m[f"quan{index}"],
                      m[f"conv{index}"])
    return m[f"bn{index}"](out)


def run_rprelu(block: nn.Module, index: int, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """RPReLU ``index`` of ``x + residual`` (the block output), as one fused operator."""
    m = block._modules
    return rprelu(x, m[f"bias{index}1"], m[f"prelu{index}"], m[f"bias{index}2"], residual=residual)
