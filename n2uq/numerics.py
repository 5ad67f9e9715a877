"""A work-around for a PyTorch numerics bug that N2UQ's layers meet, shared by every implementation.

PyTorch's CPU bfloat16 ``convolution_backward`` returns garbage in the weight gradient of a 3×3,
stride-2 convolution whose input is one pixel wide (tiny images reach ResNet's layer4 so; with
16×16 images a third of the steps gave NaN). bfloat16 values are exact in float32, so the same
products summed in float32 and rounded back give the bfloat16 result without the bug.
:func:`conv2d` is ``F.conv2d`` with that detour; nothing else differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv_needs_float32", "conv2d"]


def _cpu_autocast_bf16() -> bool:
    try:
        enabled, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except (TypeError, AttributeError):  # torch < 2.4
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return enabled and dtype == torch.bfloat16


def conv_needs_float32(x: Tensor, stride) -> bool:
    """Whether a convolution of ``x`` must run in float32 to get a correct backward (see above)."""
    if x.device.type != "cpu" or x.dim() != 4 or min(x.shape[-2:]) != 1 or max(nn.modules.utils._pair(stride)) == 1:
        return False
    return x.dtype == torch.bfloat16 or _cpu_autocast_bf16()


def conv2d(x: Tensor, weight: Tensor, stride, padding, groups: int) -> Tensor:
    """``F.conv2d(x, weight, None, stride, padding, 1, groups)``, in float32 where bf16 is wrong."""
    if conv_needs_float32(x, stride):
        with torch.autocast("cpu", enabled=False):
            out = F.conv2d(x.to(torch.bfloat16).float(), weight.to(torch.bfloat16).float(), None, stride,
                           padding, 1, groups)
        return out.to(torch.bfloat16)
    return F.conv2d(x, weight, None, stride, padding, 1, groups)
