"""Realistic random states for N2UQ models, to exercise and check the exporters without a
trained checkpoint.

"Realistic" means what training produces, not the init: learned LTQ thresholds that are unequal
and cover the data (``start``, ``a``, ``scale1`` calibrated on a batch), ``scale2`` ≠ 1, BatchNorm
running statistics close to (but not equal to) the batch statistics, affine weights with a few
negative entries, and PReLU slopes of both signs (a negative slope makes the RPReLU → LTQ chain
non-monotone, the exporter's fallback case).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from n2uq.export.graph import run_graph, trace_graph
from n2uq.quant import LTQ, PACT, HardQuantizeConv, LearnableBias

__all__ = ["randomize_"]


@torch.no_grad()
def randomize_(model: nn.Module, images: Tensor, seed: int = 0, negative_slope_fraction: float = 0.25) -> nn.Module:
    """Give ``model`` a random trained-looking state, calibrated on ``images``; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    uniform = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(shape, generator=gen)
    normal = lambda shape, std: std * torch.randn(shape, generator=gen)
    model.eval()
    for mod in model.modules():
        if isinstance(mod, LearnableBias):
            mod.bias.copy_(normal(mod.bias.shape, 0.1))
        elif isinstance(mod, nn.PReLU):
            w = uniform(mod.weight.shape, 0.0, 0.6)
            negative = torch.rand(w.shape, generator=gen) < negative_slope_fraction
            mod.weight.copy_(torch.where(negative, -uniform(w.shape, 0.02, 0.3), w))
        elif isinstance(mod, HardQuantizeConv):
            mod.weight.copy_(normal(mod.weight.shape, 0.05))
        elif isinstance(mod, nn.BatchNorm2d):
            sign = torch.where(torch.rand(mod.num_features, generator=gen) < 0.05, -1.0, 1.0)
            mod.weight.copy_(sign * uniform(mod.num_features, 0.5, 1.5))
            mod.bias.copy_(normal(mod.num_features, 0.2))
        elif isinstance(mod, PACT):
            mod.clip_val.fill_(float(uniform((), 1.5, 4.0)))

    def calibrate(mod: nn.Module, args) -> None:
        x = args[0]
        if isinstance(mod, nn.BatchNorm2d):  # running stats near the batch statistics
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))
            mod.running_mean.copy_(mean + normal(mean.shape, 0.1) * var.sqrt())
            mod.running_var.copy_(var * uniform(var.shape, 0.7, 1.4) + 1e-3)
        elif isinstance(mod, LTQ):  # thresholds spread over the input's range, unequal intervals
            spread = float(x.std()) + 1e-6
            mod.scale1.fill_(float(uniform((), 0.7, 1.3)) * 1.2 / spread)
            mod.start.fill_(float(x.mean()) * float(mod.scale1) - float(uniform((), 0.6, 1.2)))
            mod.a.copy_(mod.interval * uniform(mod.a.shape, 0.4, 1.6))
            mod.scale2.fill_(float(uniform((), 0.5, 1.5)))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules()
             if isinstance(m, (nn.BatchNorm2d, LTQ))]
    try:
        run_graph(trace_graph(model), images)
    finally:
        for h in hooks:
            h.remove()
    return model
