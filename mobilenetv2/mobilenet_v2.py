"""N2UQ MobileNetV2 (W4A4 in the paper), with the reference's layout and names (docs/SPEC.md, architectures).

``feature.0`` is a full-precision 3×3/2 stem; ``feature.1..17`` are inverted-residual blocks
whose three convolutions are quantized, each behind an RPReLU and an :class:`~n2uq.LTQ` (no
ReLU6 inside the quantized blocks); ``feature.18`` is ``PACT → quantized 1×1 conv → BN → ReLU6``;
then a 7×7 average pool (224×224 input; other input sizes pool the whole map) and the FP
classifier.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from n2uq.blocks import add_quant_stage, run_quant_stage
from n2uq.methods import Quantizers
from n2uq.quant import PACT

__all__ = ["MobileNetV2", "InvertedResidual", "CHANNELS"]

#: Output channels of feature.0 .. feature.17.
CHANNELS = [32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
_STRIDE2_TARGETS = {24, 32, 64, 160}


class StemBlock(nn.Module):
    """Full-precision ``conv 3×3/2 → BN → ReLU6`` (``feature.0``)."""

    def __init__(self, inp: int, oup: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, oup, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(oup)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(self.bn1(self.conv1(x)))


class InvertedResidual(nn.Module):
    """Quantized inverted residual: 1×1 expand, 3×3 depthwise (stride), 1×1 project.

    Submodules: stages 1-3, each ``bias{i}1, prelu{i}, bias{i}2, quan{i}, conv{i}, bn{i}``.
    """

    def __init__(self, inp: int, oup: int, mid: int, stride: int, quantizers: Quantizers):
        super().__init__()
        self.use_residual = inp == oup and stride == 1
        add_quant_stage(self, 1, inp, mid, quantizers, 1)
        add_quant_stage(self, 2, mid, mid, quantizers, 3, stride, groups=mid)
        add_quant_stage(self, 3, mid, oup, quantizers, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = run_quant_stage(self, 3, run_quant_stage(self, 2, run_quant_stage(self, 1, x)))
        return out + x if self.use_residual else out


class HeadBlock(nn.Module):
    """``PACT → quantized conv 1×1 → BN → ReLU6`` (``feature.18``; the reference's PACT variant for
    every method, the method's weight quantizer)."""

    def __init__(self, inp: int, oup: int, quantizers: Quantizers):
        super().__init__()
        self.quan1 = PACT(quantizers.n_bit)
        self.conv1 = quantizers.conv(inp, oup, 1, 1, 0)
        self.bn1 = nn.BatchNorm2d(oup)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(self.bn1(self.conv1(self.quan1(x))))


class MobileNetV2(nn.Module):
    """N2UQ MobileNetV2. ``n_bit=4`` reproduces the paper (the reference hard-codes 4);
    ``quantizers``: another method or an ablation (default N2UQ)."""

    def __init__(self, n_bit: int = 4, num_classes: int = 1000, quantizers: Optional[Quantizers] = None):
        super().__init__()
        self.quantizers = quantizers if quantizers is not None else Quantizers(n_bit)
        if self.quantizers.n_bit != n_bit:
            raise ValueError(f"n_bit {n_bit} differs from the quantizers' {self.quantizers.n_bit}")
        self.n_bit = n_bit
        self.feature = nn.ModuleList([StemBlock(3, CHANNELS[0])])
        for i in range(1, len(CHANNELS)):
            inp, oup = CHANNELS[i - 1], CHANNELS[i]
            stride = 2 if (oup != inp and oup in _STRIDE2_TARGETS) else 1
            mid = 32 if i == 1 else 6 * inp
            self.feature.append(InvertedResidual(inp, oup, mid, stride, self.quantizers))
        self.feature.append(HeadBlock(CHANNELS[-1], 1280, self.quantizers))
        self.pool1 = nn.AvgPool2d(7)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.feature:
            x = block(x)
        # AvgPool2d(7) on the 7×7 map of a 224×224 input, as the reference; other sizes pool globally.
        x = self.pool1(x) if x.shape[-2:] == (7, 7) else F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))
