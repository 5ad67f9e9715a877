"""N2UQ ResNet-18/34/50 with quantized activations (LTQ) and weights (HardQuantizeConv).

Layout and parameter names follow the code that produced the released checkpoints (docs/SPEC.md, architectures), so
those checkpoints load strictly. The first convolution and the classifier stay full precision.
Every quantized convolution is preceded by an RPReLU (``LearnableBias → PReLU → LearnableBias``)
and an :class:`~n2uq.LTQ`; the block output passes through another RPReLU.
"""

from __future__ import annotations

from typing import List, Optional, Type, Union

import torch
from torch import Tensor, nn

from n2uq.blocks import add_quant_stage, add_rprelu, quantized_shortcut, run_quant_stage, run_rprelu, run_shortcut
from n2uq.methods import Quantizers

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "ARCHS"]


def _downsample(inplanes: int, outplanes: int, stride: int, quantizers: Optional[Quantizers]) -> nn.Sequential:
    """Shortcut projection: FP ``conv1x1 → BN`` ("N2UQ *" rows, ``quantizers=None``) or
    ``LTQ → quantized conv1x1 → BN``."""
    if quantizers is not None:
        return quantized_shortcut(inplanes, outplanes, quantizers, stride)
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(outplanes),
    )


def _as_quantizers(quantizers: Union[int, Quantizers]) -> Quantizers:
    """A bit width alone means N2UQ at that width."""
    return quantizers if isinstance(quantizers, Quantizers) else Quantizers(quantizers)


class BasicBlock(nn.Module):
    """Two quantized 3×3 stages, each ``RPReLU → LTQ → HardQuantizeConv → BN``; residual; RPReLU.

    Submodules (reference names): ``bias11, prelu1, bias12, quan1, conv1, bn1``,
    ``bias21, prelu2, bias22, quan2, conv2, bn2``, ``downsample``, ``bias31, prelu3, bias32``.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, quantizers: Union[int, Quantizers] = 2):
        super().__init__()
        quantizers = _as_quantizers(quantizers)
        add_quant_stage(self, 1, inplanes, planes, quantizers, 3, stride)
        add_quant_stage(self, 2, planes, planes, quantizers, 3)
        self.downsample = downsample
        add_rprelu(self, 3, planes)

    def forward(self, x: Tensor) -> Tensor:
        out = run_quant_stage(self, 2, run_quant_stage(self, 1, x))
        return run_rprelu(self, 3, out, residual=run_shortcut(self.downsample, x))


class Bottleneck(nn.Module):
    """Quantized 1×1 → 3×3 (stride) → 1×1 (×4) stages, each behind RPReLU and LTQ; residual; RPReLU.

    Submodules: stages 1-3 (``bias{i}1, prelu{i}, bias{i}2, quan{i}, conv{i}, bn{i}``),
    ``downsample``, then the output RPReLU ``bias01, prelu0, bias02``.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, quantizers: Union[int, Quantizers] = 2):
        super().__init__()
        quantizers = _as_quantizers(quantizers)
        add_quant_stage(self, 1, inplanes, planes, quantizers, 1)
        add_quant_stage(self, 2, planes, planes, quantizers, 3, stride)
        add_quant_stage(self, 3, planes, planes * self.expansion, quantizers, 1)
        self.downsample = downsample
        add_rprelu(self, 0, planes * self.expansion)

    def forward(self, x: Tensor) -> Tensor:
        out = run_quant_stage(self, 3, run_quant_stage(self, 2, run_quant_stage(self, 1, x)))
        return run_rprelu(self, 0, out, residual=run_shortcut(self.downsample, x))


class ResNet(nn.Module):
    """torchvision-style ResNet stem and head around N2UQ blocks (docs/SPEC.md, architectures)."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int], n_bit: int = 2,
                 quantize_downsample: bool = False, num_classes: int = 1000, quantizers: Optional[Quantizers] = None):
        super().__init__()
        self.quantizers = quantizers if quantizers is not None else Quantizers(n_bit)
        if self.quantizers.n_bit != n_bit:
            raise ValueError(f"n_bit {n_bit} differs from the quantizers' {self.quantizers.n_bit}")
        self.n_bit = n_bit
        self.quantize_downsample = bool(quantize_downsample)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _downsample(self.inplanes, planes * block.expansion, stride,
                                     self.quantizers if self.quantize_downsample else None)
        layers = [block(self.inplanes, planes, stride, downsample, self.quantizers)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, quantizers=self.quantizers) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(n_bit: int = 2, quantize_downsample: bool = False, num_classes: int = 1000,
             quantizers: Optional[Quantizers] = None) -> ResNet:
    """N2UQ ResNet-18 (BasicBlock, [2, 2, 2, 2]); ``quantizers``: another method or an ablation (default N2UQ)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], n_bit, quantize_downsample, num_classes, quantizers)


def resnet34(n_bit: int = 2, quantize_downsample: bool = False, num_classes: int = 1000,
             quantizers: Optional[Quantizers] = None) -> ResNet:
    """N2UQ ResNet-34 (BasicBlock, [3, 4, 6, 3]); ``quantizers``: another method or an ablation (default N2UQ)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], n_bit, quantize_downsample, num_classes, quantizers)


def resnet50(n_bit: int = 2, quantize_downsample: bool = False, num_classes: int = 1000,
             quantizers: Optional[Quantizers] = None) -> ResNet:
    """N2UQ ResNet-50 (Bottleneck, [3, 4, 6, 3]); ``quantizers``: another method or an ablation (default N2UQ)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], n_bit, quantize_downsample, num_classes, quantizers)


ARCHS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
