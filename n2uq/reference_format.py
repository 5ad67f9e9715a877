"""Resuming a checkpoint written by the reference training script (and every released
``model_best.pth.tar``, which has the same format).

Such a file is ``{'epoch', 'state_dict', 'best_top1_acc', 'optimizer'}`` with no ``scheduler``
entry. Its ``optimizer`` is the state of an Adam built over the reference's ``model.parameters()``
— the state-dict order less the BatchNorm buffers, so the reference's frozen constants (``two``,
``one``, ``zero``, ``minusone``, ``eps`` of every LTQ, ``clip_val`` and ``zero`` of every
HardQuantizeConv) are in it — split into three groups, in this order: alpha (names containing an
alpha pattern), other (the rest) and weights (4-D, no ``bias`` in the name). Parameters are
numbered through the groups in order; Adam keeps state only for parameters that got a gradient.

Here the constants are buffers or frozen parameters and no optimizer sees them. The saved state
is mapped onto this run's optimizer by name when the saved groups have exactly the reference's
sizes for this model (after dropping the constants, every parameter corresponds one to one);
otherwise it is skipped, and the run says so. The reference has no schedule state: it replays
``scheduler.step()`` once per finished epoch, which :func:`replay_schedule` does too.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from n2uq.recipe import GROUP_NAMES, parameter_group, scheduler_step

__all__ = ["BN_BUFFERS", "is_reference_checkpoint", "reference_parameter_groups", "map_reference_adam_state",
           "replay_schedule"]

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def is_reference_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """True for a file of the reference's format: every checkpoint this project writes has ``scheduler``."""
    return "scheduler" not in ckpt


def reference_parameter_groups(model: nn.Module, alpha_patterns: Sequence[str]) -> Dict[str, List[str]]:
    """``{'alpha', 'other', 'weights'}``: the names in each group of the reference's optimizer for ``model``.

    The reference's parameters are the state-dict entries less the BatchNorm buffers, in
    state-dict order (frozen constants included); the group rules are those of :mod:`n2uq.recipe`.
    """
    groups: Dict[str, List[str]] = {name: [] for name in GROUP_NAMES}
    for name, value in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in BN_BUFFERS:
            continue
        groups[parameter_group(name, value, alpha_patterns)].append(name)
    return groups


def _saved_names(saved: Any, expected: Dict[str, List[str]]) -> Tuple[Optional[Dict[int, str]], str]:
    """``{saved index: parameter name}`` when the saved groups have the reference's sizes, else a reason."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), Mapping):
        return None, "the file has no optimizer state"
    sizes = [len(g.get("params", [])) if isinstance(g, Mapping) else -1 for g in saved["param_groups"]]
    wanted = [len(expected[name]) for name in GROUP_NAMES]
    if sizes != wanted:
        return None, (f"its {len(sizes)} parameter group(s) hold {sizes} parameters, the reference's optimizer of "
                      f"this model {wanted}")
    names: Dict[int, str] = {}
    for group, group_name in zip(saved["param_groups"], GROUP_NAMES):
        names.update(zip((int(i) for i in group["params"]), expected[group_name]))
    return names, ""


def map_reference_adam_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: Any,
                             alpha_patterns: Sequence[str]) -> Tuple[Optional[Dict[str, Any]], str]:
    """A state dict for ``optimizer`` holding the reference file's Adam state ``saved``, and a line.

    Returns ``(state_dict, what was done)``, or ``(None, why it was skipped)`` when the saved state
    does not correspond one to one to ``optimizer``'s parameters once the frozen constants are
    dropped. ``optimizer``'s own hyperparameters (lr, betas, weight decay) are kept.
    """
    names, reason = _saved_names(saved, reference_parameter_groups(model, alpha_patterns))
    if names is None:
        return None, reason
    by_name = {name: i for i, name in names.items()}
    own = optimizer.state_dict()
    param_names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: Dict[int, Any] = {}
    for index, param in zip((i for g in own["param_groups"] for i in g["params"]), params):
        name = param_names.get(id(param))
        if name not in by_name:
            return None, f"the parameter {name} of this run is not in its optimizer"
        entry = saved["state"].get(by_name[name]) or saved["state"].get(str(by_name[name]))
        if entry is None:
            continue  # no gradient reached it before the save: Adam has no state for it yet
        shapes = {k: tuple(v.shape) for k, v in entry.items() if k in ("exp_avg", "exp_avg_sq")}
        if set(shapes.values()) != {tuple(param.shape)}:
            return None, f"its state of {name} has shapes {shapes}, the parameter {list(param.shape)}"
        state[index] = dict(entry)
    trainable = {param_names[id(p)] for p in params}
    dropped = sum(1 for name in names.values() if name not in trainable)
    return ({"state": state, "param_groups": own["param_groups"]},
            f"Adam state of {len(state)} parameter(s) mapped onto this run's groups ({dropped} frozen constant(s) "
            f"of the reference's optimizer dropped)")


def replay_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    """Step the schedule ``steps`` times, as the reference's script does once per finished epoch."""
    for _ in range(steps):
        scheduler_step(scheduler)
