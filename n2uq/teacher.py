"""The frozen full-precision teacher for knowledge distillation (the paper's: torchvision ResNet-101).

``--teacher NAME`` is a torchvision classification model name; ``--teacher_weights`` is
``imagenet`` (torchvision's default weights, downloaded once into the torch hub cache), a local
state-dict file, or ``none``. ``none`` (for either flag) means no teacher: the student trains on
labels with label-smoothed cross-entropy.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import nn

from n2uq.checkpoint import CheckpointError, extract_state_dict, load_state_dict_strict, read_checkpoint
from n2uq.pretrained import PretrainedError, fetch_torchvision_weights

__all__ = ["TeacherError", "uses_teacher", "unknown_teacher", "check_teacher", "build_teacher"]


class TeacherError(RuntimeError):
    """The teacher could not be built or its weights could not be found."""


def uses_teacher(teacher: str, teacher_weights: str) -> bool:
    return teacher.lower() != "none" and teacher_weights.lower() != "none"


def unknown_teacher(name: str, weights: str) -> Optional[str]:
    """Why ``--teacher name`` (with ``--teacher_weights weights``) names no model to build, or
    ``None`` when it does or no teacher is used; a usage error, checked with the other flags."""
    import torchvision.models as tvm

    if not uses_teacher(name, weights) or name in tvm.list_models(module=tvm):
        return None
    return (f"unknown --teacher {name!r}: not a torchvision classification model (e.g. resnet101, resnet50); "
            f"or --teacher none")


def _torchvision_models(name: str):
    import torchvision.models as tvm

    problem = unknown_teacher(name, "imagenet")
    if problem:
        raise TeacherError(problem)
    return tvm


def _check_imagenet_classes(num_classes: int) -> None:
    if num_classes != 1000:
        raise TeacherError(f"--teacher_weights imagenet gives 1000 outputs but the data has {num_classes} "
                           f"classes; pass --teacher_weights FILE trained on these classes, or --teacher none")


def _read_weights(weights: str):
    if not os.path.isfile(weights):
        raise TeacherError(f"--teacher_weights file not found: {weights} (use imagenet, a file, or none)")
    try:
        return extract_state_dict(read_checkpoint(weights), source=weights)
    except CheckpointError as exc:
        raise TeacherError(str(exc)) from None


def _load_strict(model: nn.Module, state_dict, source: str) -> None:
    try:
        load_state_dict_strict(model, state_dict, source=f"teacher weights {source}")
    except CheckpointError as exc:
        raise TeacherError(" ".join(line.strip() for line in str(exc).splitlines())) from None


def check_teacher(name: str, weights: str, num_classes: int) -> str:
    """What :func:`build_teacher` would build for ``num_classes`` classes, checked without building it
    (``--check_only``): the name, the class count of ImageNet weights, a file's keys and shapes.
    Returns a description; raises :class:`TeacherError` as :func:`build_teacher` would."""
    if not uses_teacher(name, weights):
        return "none"
    tvm = _torchvision_models(name)
    if weights == "imagenet":
        _check_imagenet_classes(num_classes)
        return f"{name} with torchvision's ImageNet weights (1000 classes)"
    state_dict = _read_weights(weights)
    with torch.device("meta"):  # the layout only: no memory, no initialisation
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    with warnings.catch_warnings():  # loading into meta tensors copies nothing, and says so per tensor
        warnings.simplefilter("ignore", UserWarning)
        _load_strict(model, state_dict, weights)
    return f"{name} with {weights} ({num_classes} classes)"


def build_teacher(name: str, weights: str, num_classes: int) -> Optional[nn.Module]:
    """A frozen teacher in eval mode with ``num_classes`` outputs, or ``None`` when disabled."""
    if not uses_teacher(name, weights):
        return None
    tvm = _torchvision_models(name)
    if weights == "imagenet":
        _check_imagenet_classes(num_classes)
        enum = tvm.get_model_weights(name)
        # The reference's ``pretrained=True`` meant IMAGENET1K_V1.
        default = getattr(enum, "IMAGENET1K_V1", enum.DEFAULT)
        try:
            state_dict = fetch_torchvision_weights(default, "--teacher_weights FILE, or --teacher none")
        except PretrainedError as exc:
            raise TeacherError(f"teacher {name}: {exc}") from None
        source = f"torchvision {name} {default}"
    else:
        state_dict, source = _read_weights(weights), weights
    model = tvm.get_model(name, weights=None, num_classes=num_classes)
    _load_strict(model, state_dict, source)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
