"""Build an N2UQ model from a :class:`n2uq.checkpoint.ModelConfig` (shared by the scripts).

The library (``n2uq``) never imports an architecture folder; scripts do, through this module.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from mobilenetv2.mobilenet_v2 import MobileNetV2  # noqa: E402
from n2uq.checkpoint import ModelConfig, load_model_state, load_state_dict_strict  # noqa: E402
from n2uq.methods import Quantizers  # noqa: E402
from resnet.resnet import ARCHS as RESNET_ARCHS  # noqa: E402

ARCH_NAMES = (*RESNET_ARCHS, "mobilenetv2")


def build_model(config: ModelConfig) -> nn.Module:
    """The model with the architecture, bit width, quantizers, downsample kind and classes of ``config``."""
    quantizers = Quantizers(config.n_bit, config.method, config.learned_thresholds, config.entropy_preserving)
    if config.arch in RESNET_ARCHS:
        return RESNET_ARCHS[config.arch](config.n_bit, config.quantize_downsample, config.num_classes, quantizers)
    if config.arch == "mobilenetv2":
        return MobileNetV2(config.n_bit, config.num_classes, quantizers)
    raise ValueError(f"unknown architecture {config.arch!r}; known: {', '.join(ARCH_NAMES)}")


def full_precision_resnet(state_dict: Dict[str, Tensor]) -> Optional[Tuple[str, int]]:
    """``(arch, num_classes)`` when ``state_dict`` is exactly a torchvision ResNet-18/34/50 (the
    full-precision baseline ``resnet/train.py --full_precision`` trains, or torchvision's own
    weights), else ``None``. Every key and shape must match."""
    fc = state_dict.get("fc.weight")
    if fc is None or fc.dim() != 2 or any(".quan" in key for key in state_dict):
        return None
    for arch in RESNET_ARCHS:
        reference = build_full_precision(arch, fc.shape[0]).state_dict()
        if reference.keys() == state_dict.keys() and all(
                reference[k].shape == state_dict[k].shape for k in reference):
            return arch, int(fc.shape[0])
    return None


#: torchvision's builder of each architecture's full-precision model (same name but for MobileNetV2).
TORCHVISION_NAMES = {"mobilenetv2": "mobilenet_v2"}


def build_full_precision(arch: str, num_classes: int) -> nn.Module:
    """torchvision's full-precision ``arch`` (``resnet18``…, ``mobilenetv2`` → ``mobilenet_v2``)."""
    import torchvision

    return getattr(torchvision.models, TORCHVISION_NAMES.get(arch, arch))(num_classes=num_classes)


def load_checkpoint_model(path: str) -> Tuple[nn.Module, str, Dict[str, Any]]:
    """``(model with the file's weights loaded strictly, its tag, the file's other entries)``."""
    state_dict, config, meta = load_model_state(path)
    model = build_model(config)
    load_state_dict_strict(model, state_dict, source=path)
    return model, config.tag, meta


def evaluation_sizes(meta: Dict[str, Any], image_size: Optional[int] = None,
                     val_resize: Optional[int] = None) -> Tuple[int, int]:
    """``(center crop, resize)`` for evaluating a checkpoint: the given values, else the training run's
    (``meta['args']``), else 224 and ``max(256, crop)``."""
    trained = training_args(meta)
    image_size = image_size or int(trained.get("image_size", 224))
    return image_size, val_resize or int(trained.get("val_resize", max(256, image_size)))


def training_args(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The training run's arguments a checkpoint records (``{}`` for a file without them)."""
    return meta.get("args") if isinstance(meta.get("args"), dict) else {}
