"""The paper's optimisation recipe: three Adam parameter groups and the linear LR decay.

Groups, in the reference's order:

* ``alpha`` (lr / 10, no weight decay): parameters whose name contains one of the architecture's
  alpha patterns — ``quan1.a``, ``quan2.a``, ``scale``, ``start`` for the ResNets (so, as in the
  reference, ResNet-50's ``quan3.a`` and every ``downsample.0.a`` train at the full lr) and also
  ``quan3.a`` for MobileNetV2. ``all_ltq_a=True`` (``--alpha_group all_ltq``) puts every
  :class:`~n2uq.LTQ` ``a`` here.
* ``other`` (lr, no weight decay): everything else — and every LTQ ``a`` of a model built with
  ``--full_lr_thresholds`` (:attr:`n2uq.methods.Quantizers.full_lr_thresholds`, a departure from the
  reference: its ResNets train ``quan1.a``/``quan2.a`` at lr/10). The two switches move the same
  parameters in opposite directions, so they cannot be combined.
* ``weights`` (lr, the configured weight decay): 4-D parameters without ``bias`` in the name
  (a 4-D parameter that is also an alpha parameter stays in ``alpha``).

Only parameters with ``requires_grad`` are optimised (``HardQuantizeConv.clip_val``/``zero`` are not).
Schedule: ``LambdaLR(1 - step / epochs)`` stepped once at the *start* of every epoch, so epoch
``e`` (0-based) runs at ``lr · (1 - (e + 1) / epochs)``.
"""

from __future__ import annotations

import re
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from n2uq.methods import intervals_at_full_lr
from n2uq.quant import LTQ

__all__ = ["RESNET_ALPHA_PATTERNS", "MOBILENETV2_ALPHA_PATTERNS", "GROUP_NAMES", "split_parameters", "parameter_group",
           "build_optimizer", "build_scheduler", "scheduler_step", "lr_at_epoch"]

RESNET_ALPHA_PATTERNS: Tuple[str, ...] = ("quan1.a", "quan2.a", "scale", "start")
MOBILENETV2_ALPHA_PATTERNS: Tuple[str, ...] = ("quan1.a", "quan2.a", "quan3.a", "scale", "start")
GROUP_NAMES = ("alpha", "other", "weights")
ALPHA_LR_FACTOR = 0.1
#: L2 decay on PACT's clipping levels (``--pact_alpha_decay``), for the compared PACT method.
PACT_ALPHA_DECAY = 1e-4


def split_parameters(model: nn.Module, alpha_patterns: Iterable[str],
                     all_ltq_a: bool = False) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """``{'alpha': [...], 'other': [...], 'weights': [...]}`` of ``(name, parameter)`` (trainable only).

    Raises ``ValueError`` for ``all_ltq_a`` on a model whose LTQs are marked for the full lr."""
    patterns = tuple(alpha_patterns)
    full_lr_a = {id(m.a) for m in model.modules() if intervals_at_full_lr(m)}
    if all_ltq_a and full_lr_a:
        raise ValueError("--alpha_group all_ltq puts every interval length at lr/10 and --full_lr_thresholds at the "
                         "full lr; pass one of them")
    ltq_a = {id(m.a) for m in model.modules() if isinstance(m, LTQ)} if all_ltq_a else set()
    groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {name: [] for name in GROUP_NAMES}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = "alpha" if id(p) in ltq_a else parameter_group(name, p, patterns, id(p) in full_lr_a)
        groups[group].append((name, p))
    return groups


def parameter_group(name: str, value: torch.Tensor, alpha_patterns: Iterable[str],
                    full_lr_interval: bool = False) -> str:
    """The reference's group of one parameter: ``alpha`` (name matches a pattern), ``weights`` (4-d,
    not a bias), else ``other``. ``full_lr_interval``: the parameter is an LTQ ``a`` of a
    ``--full_lr_thresholds`` model, which goes to ``other`` (full lr) whatever its name."""
    if full_lr_interval:
        return "other"
    if any(pattern in name for pattern in alpha_patterns):
        return "alpha"
    return "weights" if value.dim() == 4 and "bias" not in name else "other"


def build_optimizer(model: nn.Module, lr: float = 1.25e-3, weight_decay: float = 0.0,
                    betas: Tuple[float, float] = (0.9, 0.999),
                    alpha_patterns: Sequence[str] = RESNET_ALPHA_PATTERNS,
                    all_ltq_a: bool = False, pact_alpha_decay: Optional[float] = None) -> torch.optim.Adam:
    """Adam over the three groups; each group dict carries its ``name``.

    A model of the compared PACT method has a fourth group, ``pact_alpha``: its clipping levels
    (parameters named ``*.clip_alpha``) at the full lr with L2 decay ``pact_alpha_decay`` (``None``:
    :data:`PACT_ALPHA_DECAY`), as the PACT paper regularises them; N2UQ models keep the reference's three groups.

    ``foreach=True`` on every device: PyTorch's CPU default (one kernel per tensor) is about ten
    times slower on ResNet-18 and gives the same update up to float rounding.
    """
    groups = split_parameters(model, alpha_patterns, all_ltq_a)
    clip = [p for name, p in groups["other"] if name.endswith(".clip_alpha")]
    param_groups = [
        {"name": "alpha", "params": [p for _, p in groups["alpha"]], "lr": lr * ALPHA_LR_FACTOR,
         "weight_decay": 0.0},
        {"name": "other", "params": [p for name, p in groups["other"] if not name.endswith(".clip_alpha")],
         "weight_decay": 0.0},
        {"name": "weights", "params": [p for _, p in groups["weights"]], "weight_decay": weight_decay},
    ]
    if clip:
        decay = PACT_ALPHA_DECAY if pact_alpha_decay is None else pact_alpha_decay
        param_groups.append({"name": "pact_alpha", "params": clip, "weight_decay": decay})
    return torch.optim.Adam(param_groups, lr=lr, betas=betas, weight_decay=0.0, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR(lambda step: 1 - step / epochs)``: the paper's linear decay."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / epochs)


def scheduler_step(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Advance the schedule at the start of an epoch (before that epoch's optimizer steps, on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        scheduler.step()


def lr_at_epoch(base_lr: float, epoch: int, epochs: int) -> float:
    """The lr epoch ``epoch`` (0-based) trains at: ``base_lr · (1 - (epoch + 1) / epochs)``."""
    return base_lr * (1.0 - (epoch + 1) / epochs)
