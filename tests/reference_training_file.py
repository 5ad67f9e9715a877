"""Checkpoints written the way the reference's training script writes them, for resume tests.

The reference's model holds its constants (``two, one, zero, minusone, eps`` of every LTQ,
``clip_val, zero`` of every HardQuantizeConv) as parameters, so its ``model.parameters()`` is the
state dict less the BatchNorm buffers; its script builds Adam over three groups (alpha at lr/10,
other, weights with weight decay), steps a LambdaLR once per epoch, and saves
``{'epoch', 'state_dict', 'best_top1_acc', 'optimizer'}`` from an ``nn.DataParallel`` model. This
module rebuilds that from one of our models, independently of ``n2uq.reference_format``.
"""

from __future__ import annotations

import warnings
from typing import List, Sequence, Tuple

import torch
from torch import nn

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def reference_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` in the order of the reference model's ``parameters()``.

    Our trainable parameters are used as they are (so a backward pass reaches them); every constant
    becomes a parameter of its own, frozen except HardQuantizeConv's ``clip_val``, which the
    reference leaves trainable but which never gets a gradient.
    """
    own = dict(model.named_parameters())
    params = []
    for name, value in model.state_dict(keep_vars=True).items():
        if name.rsplit(".", 1)[-1] in BN_BUFFERS:
            continue
        param = own.get(name)
        if param is None or not param.requires_grad:
            param = nn.Parameter(value.detach().clone(), requires_grad=name.endswith("clip_val"))
        params.append((name, param))
    return params


def reference_optimizer(params: List[Tuple[str, nn.Parameter]], alpha_patterns: Sequence[str], lr: float,
                        weight_decay: float = 0.0) -> torch.optim.Adam:
    """The reference script's Adam: weights = 4-D without 'bias'; alpha = a pattern in the name; other = the rest."""
    weights = [p for name, p in params if p.ndimension() == 4 and "bias" not in name]
    alpha = [p for name, p in params if any(pattern in name for pattern in alpha_patterns)]
    taken = {id(p) for p in weights + alpha}
    other = [p for _, p in params if id(p) not in taken]
    return torch.optim.Adam([{"params": alpha, "lr": lr / 10}, {"params": other, "lr": lr},
                             {"params": weights, "weight_decay": weight_decay, "lr": lr}], betas=(0.9, 0.999))


def write_reference_checkpoint(model: nn.Module, path, alpha_patterns: Sequence[str], epoch: int,
                               best_top1: float = 50.0, lr: float = 1.25e-3, epochs: int = 128,
                               image_size: int = 32) -> dict:
    """Take one reference Adam step on ``model`` (after ``epoch + 1`` scheduler steps) and save the
    reference's checkpoint of it to ``path``; returns what was saved, plus (not saved) under
    ``"index_names"`` the parameter name of each optimizer index (numbered through the groups)."""
    params = reference_parameters(model)
    optimizer = reference_optimizer(params, alpha_patterns, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(epoch + 1):
            scheduler.step()
    torch.manual_seed(0)
    model.train()
    logits = model(torch.randn(2, 3, image_size, image_size))
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ckpt = {"epoch": epoch, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "best_top1_acc": best_top1, "optimizer": optimizer.state_dict()}
    torch.save(ckpt, path)
    name_of = {id(p): name for name, p in params}
    return {**ckpt, "index_names": [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]}
