"""The step protocol of an integer model (:class:`Op`) and the steps that stay in float.

An :class:`~n2uq.export.integer_model.IntegerModel` is a list of ops; each reads named tensors
and writes one. The float steps here (first conv, FP downsample, BatchNorm on float tensors,
residual additions, the block-output RPReLU, pooling, ``fc``) compute exactly what the fake-quant
model computes, with the same PyTorch calls. The integer steps (quantizer units, integer
convolutions, dequantization) are in :mod:`n2uq.export.integer_ops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Op", "ConvGeometry", "per_channel", "FLOAT_OPS", "FloatConv", "BatchNorm", "Relu", "Relu6", "MaxPool",
           "GlobalAvgPool", "Flatten", "Linear", "Add", "RPReLU"]


def per_channel(v: Tensor) -> Tensor:
    """A per-channel vector ``[C]`` shaped ``[1, C, 1, 1]`` to broadcast over ``N, C, H, W``."""
    return v.view(1, -1, 1, 1)


class Op(nn.Module):
    """One step of the integer model: reads the named tensors ``inputs``, writes ``output``.

    Parameters live in buffers (``tensors()``, saved by :mod:`n2uq.export.packing`); ``attrs()``
    returns the JSON-able rest, and :meth:`from_saved` rebuilds the op from the two.
    """

    def __init__(self, name: str, inputs: Tuple[str, ...], output: str):
        super().__init__()
        self.name, self.inputs, self.output = name, tuple(inputs), output

    def attrs(self) -> Dict[str, Any]:
        return {}

    def tensors(self) -> Dict[str, Tensor]:
        return dict(self.named_buffers(recurse=False))

    @classmethod
    def from_saved(cls, name: str, inputs: Sequence[str], output: str, attrs: Mapping[str, Any],
                   tensors: Mapping[str, Tensor]) -> Op:
        """The op whose ``attrs()`` and ``tensors()`` were saved (the inverse of saving)."""
        return cls(name, tuple(inputs), output, **attrs, **tensors)

    def extra_repr(self) -> str:
        return f"{self.name}: {', '.join(self.inputs)} -> {self.output}"


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding, dilation and groups of a 2-D convolution (each pair as ``(h, w)``)."""

    stride: Sequence[int] = (1, 1)
    padding: Sequence[int] = (0, 0)
    dilation: Sequence[int] = (1, 1)
    groups: int = 1


class FloatConv(Op):
    """A full-precision convolution (the first conv, the FP downsample)."""

    def __init__(self, name, inputs, output, weight: Tensor, bias: Optional[Tensor] = None,
                 geometry: Optional[ConvGeometry] = None):
        super().__init__(name, inputs, output)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        geometry = geometry or ConvGeometry()
        self.stride, self.padding = list(geometry.stride), list(geometry.padding)
        self.dilation, self.groups = list(geometry.dilation), int(geometry.groups)

    def attrs(self):
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    @classmethod
    def from_saved(cls, name, inputs, output, attrs, tensors):
        geometry = ConvGeometry(attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])
        return cls(name, tuple(inputs), output, **tensors, geometry=geometry)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BatchNorm(Op):
    """Eval-mode BatchNorm on a float tensor (the same call as ``nn.BatchNorm2d.eval()``)."""

    def __init__(self, name, inputs, output, running_mean: Tensor, running_var: Tensor,
                 weight: Tensor, bias: Tensor, eps: float = 1e-5):
        super().__init__(name, inputs, output)
        for key, value in (("running_mean", running_mean), ("running_var", running_var),
                           ("weight", weight), ("bias", bias)):
            self.register_buffer(key, value)
        self.eps = float(eps)

    def attrs(self):
        return {"eps": self.eps}

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Relu(Op):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class Relu6(Op):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x)


class MaxPool(Op):
    def __init__(self, name, inputs, output, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                 dilation=(1, 1), ceil_mode: bool = False):
        super().__init__(name, inputs, output)
        self.kernel, self.stride, self.padding = list(kernel), list(stride), list(padding)
        self.dilation, self.ceil_mode = list(dilation), bool(ceil_mode)

    def attrs(self):
        return {"kernel": self.kernel, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "ceil_mode": self.ceil_mode}

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)


class GlobalAvgPool(Op):
    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, 1)


class Flatten(Op):
    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(x, 1)


class Linear(Op):
    def __init__(self, name, inputs, output, weight: Tensor, bias: Optional[Tensor] = None):
        super().__init__(name, inputs, output)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Add(Op):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class RPReLU(Op):
    """``LearnableBias → PReLU → LearnableBias`` on a float tensor (a block's output)."""

    def __init__(self, name, inputs, output, bias1: Tensor, slope: Tensor, bias2: Tensor):
        super().__init__(name, inputs, output)
        self.register_buffer("bias1", bias1)
        self.register_buffer("slope", slope)
        self.register_buffer("bias2", bias2)

    def forward(self, x: Tensor) -> Tensor:
        return F.prelu(x + per_channel(self.bias1), self.slope) + per_channel(self.bias2)


#: The float op types, in the order an integer model's type table lists them.
FLOAT_OPS = (FloatConv, BatchNorm, Relu, Relu6, MaxPool, GlobalAvgPool, Flatten, Linear, Add, RPReLU)
