"""Checkpoint reading: safe loading, reference formats, strict loads with a key report, and
inference of a model's configuration from its state dict alone.

The released N2UQ checkpoints are ``{'epoch', 'state_dict', 'best_top1_acc', 'optimizer'}``
dictionaries saved from an ``nn.DataParallel`` model, so every key starts with ``module.``.
Files are read with ``torch.load(weights_only=True)``: a pickle that would construct arbitrary
objects (and so could run code) is refused.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from n2uq.methods import method_tag

__all__ = [
    "CheckpointError",
    "StateDictMismatchError",
    "ModelConfig",
    "read_checkpoint",
    "read_state_and_meta",
    "extract_state_dict",
    "strip_prefixes",
    "load_state_dict_strict",
    "state_dict_mismatch",
    "infer_config",
    "load_model_state",
]

_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read, is unsafe, or is not an N2UQ model state."""


class StateDictMismatchError(CheckpointError):
    """A state dict does not fit a model; the message lists the offending keys."""

    def __init__(self, message: str, missing: List[str], unexpected: List[str],
                 mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


@dataclass(frozen=True)
class ModelConfig:
    """What a checkpoint is: enough to rebuild the model that produced it."""

    arch: str  # resnet18 | resnet34 | resnet50 | mobilenetv2
    n_bit: int
    quantize_downsample: bool
    num_classes: int
    method: str = "n2uq"  # n2uq | lsq | pact | dorefa (n2uq.methods)
    learned_thresholds: bool = True  # N2UQ ablations (recorded in this project's checkpoints)
    entropy_preserving: bool = True
    full_lr_thresholds: bool = False  # the intervals trained at the full lr (a departure from the reference)

    @property
    def method_tag(self) -> str:
        """``n2uq``, ``lsq``, ... or N2UQ with its ablations and variants (``n2uq-uniform-thresholds``,
        ``n2uq-full-lr-thresholds``, ...): the tag of the run folder it was trained in."""
        return method_tag(self.method, self.learned_thresholds, self.entropy_preserving, self.full_lr_thresholds)

    @property
    def tag(self) -> str:
        """Short name, e.g. ``resnet18_w2a2_qd0``, ``mobilenetv2_w4a4`` or ``resnet18_lsq_w2a2_qd0``."""
        bits = f"w{self.n_bit}a{self.n_bit}"
        if self.method_tag != "n2uq":
            bits = f"{self.method_tag}_{bits}"
        if self.arch == "mobilenetv2":
            return f"{self.arch}_{bits}"
        return f"{self.arch}_{bits}_qd{int(self.quantize_downsample)}"

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """Load a checkpoint file safely (``weights_only=True``) and return whatever it holds.

    Raises :class:`CheckpointError` with one clear sentence for a missing path, a directory, an
    empty or truncated file, a file that is not a PyTorch checkpoint, and a pickle that asks for
    objects other than tensors and plain containers (which is refused, not executed).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, expected a file: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        if "Weights only load failed" in str(exc) or "GLOBAL" in str(exc) or "Unsupported" in str(exc):
            raise CheckpointError(
                f"refusing to load {path}: it contains Python objects other than tensors and plain "
                f"containers, and unpickling it could run arbitrary code ({detail.strip()}). "
                f"Only load files you trust; re-save it as a plain state dict."
            ) from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({detail.strip()})") from None
    except Exception as exc:  # truncated zip, legacy pickle garbage, wrong magic number, ...
        msg = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, KeyError):  # the legacy loader read a byte that starts no pickle
            msg = "neither a PyTorch zip archive nor a pickle"
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {msg}"
        ) from None


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: Iterable[str] = _PREFIXES) -> Dict[str, Any]:
    """Remove leading ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) from keys."""
    prefixes = tuple(prefixes)
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def extract_state_dict(obj: Any, source: str = "checkpoint") -> Dict[str, Tensor]:
    """The model state inside a loaded checkpoint, with ``module.`` prefixes stripped.

    Accepts a raw state dict, or a dict holding it under ``state_dict`` (the reference and this
    project) or ``model``.
    """
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds no model state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{source} holds no model state dict (no tensor entries)")
    return strip_prefixes(tensors)


# ---------------------------------------------------------------------------------------------
# Strict loading with a readable report
# ---------------------------------------------------------------------------------------------


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor]):
    """``(missing, unexpected, mismatched)`` keys between ``model`` and ``state_dict``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(own[k].shape))
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, mismatched


def _format_keys(title: str, items: List[str], show: int) -> str:
    head = ", ".join(items[:show]) + (f", ... (+{len(items) - show} more)" if len(items) > show else "")
    return f"  {title} ({len(items)}): {head}"


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint",
                           show: int = 5) -> None:
    """Load every key strictly; on any mismatch raise one :class:`StateDictMismatchError` listing
    missing, unexpected and shape-mismatched keys (the first ``show`` of each, with counts)."""
    state_dict = strip_prefixes(state_dict)
    missing, unexpected, mismatched = state_dict_mismatch(model, state_dict)
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model ({type(model).__name__}):"]
        if missing:
            lines.append(_format_keys("missing keys", missing, show))
        if unexpected:
            lines.append(_format_keys("unexpected keys", unexpected, show))
        if mismatched:
            shapes = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
            lines.append(_format_keys("shape mismatches", shapes, show))
        try:
            cfg = infer_config(state_dict)
            lines.append(f"  the checkpoint looks like {cfg.tag} (num_classes={cfg.num_classes})")
        except CheckpointError:
            pass
        raise StateDictMismatchError("\n".join(lines), missing, unexpected, mismatched)
    model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------
# Configuration inference
# ---------------------------------------------------------------------------------------------

_RESNET_LAYOUTS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
}
_MBV2_BLOCKS = 19


def _bits_from_levels(n_val: int, key: str) -> int:
    n_bit = (n_val + 1).bit_length() - 1
    if n_val < 1 or 2**n_bit - 1 != n_val or n_bit > 8:
        raise CheckpointError(f"{key} has {n_val} entries; expected 2^b - 1 for b in 1..8")
    return n_bit


def _method_of(sd: Mapping[str, Tensor], first_quan: str) -> str:
    """The quantization method, from the state of the first quantized stage (``first_quan`` is its
    LTQ's ``a`` key, e.g. ``layer1.0.quan1.a``)."""
    prefix = first_quan[: -len("a")]
    if first_quan in sd:
        return "n2uq"
    if prefix + "step" in sd:
        return "lsq"
    if prefix + "clip_alpha" in sd:
        return "pact"
    conv, rprelu = prefix.replace("quan", "conv"), prefix.replace("quan1.", "bias11.bias")
    if conv + "weight" in sd and conv + "clip_val" not in sd and rprelu in sd:  # N2UQ's skeleton, no state
        return "dorefa"
    return ""


def _recorded(meta: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The quantizer choice a checkpoint of this project records (``config['quantizers']``)."""
    config = (meta or {}).get("config")
    quantizers = config.get("quantizers") if isinstance(config, Mapping) else None
    return dict(quantizers) if isinstance(quantizers, Mapping) else {}


def infer_config(state_dict: Mapping[str, Tensor], meta: Optional[Mapping[str, Any]] = None) -> ModelConfig:
    """Infer ``(arch, n_bit, quantize_downsample, num_classes, method)`` from keys and shapes.

    ResNet: blocks per stage (``layerS.B.``), bottleneck when blocks have ``conv3``, quantized
    downsample when ``downsample.0`` is a quantizer; MobileNetV2: ``feature.`` keys. N2UQ's bits come
    from ``len(quan1.a) = 2^b - 1``. The compared methods' quantizers hold no bit width, and N2UQ's
    ablations change no key: for those, ``meta`` (the checkpoint's other entries) must record them
    (``config['quantizers']``, as this project's checkpoints do). Raises :class:`CheckpointError`
    when the layout is unknown.
    """
    sd = strip_prefixes(state_dict)
    if "fc.weight" not in sd or sd["fc.weight"].dim() != 2:
        raise CheckpointError("unrecognised state dict: no 2-D 'fc.weight' (not an N2UQ ResNet/MobileNetV2)")
    num_classes = int(sd["fc.weight"].shape[0])
    recorded = _recorded(meta)

    if any(k.startswith("feature.") for k in sd):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"feature\.(\d+)\.", k))}
        method = _method_of(sd, "feature.1.quan1.a")
        if blocks != set(range(_MBV2_BLOCKS)) or not method:
            raise CheckpointError(
                f"unrecognised MobileNetV2-like state dict: feature blocks {sorted(blocks)[:5]}..., "
                f"expected feature.0..18 with quantized stages"
            )
        return _config("mobilenetv2", False, num_classes, (sd, "feature.1.quan1.a", method), recorded)

    counts: Counter = Counter()
    for k in sd:
        m = re.match(r"layer([1-4])\.(\d+)\.", k)
        if m:
            counts[int(m.group(1))] = max(counts[int(m.group(1))], int(m.group(2)) + 1)
    if not counts:
        raise CheckpointError("unrecognised state dict: neither 'layerN.' (ResNet) nor 'feature.' "
                              "(MobileNetV2) keys")
    layers = tuple(counts.get(i, 0) for i in range(1, 5))
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    arch = _RESNET_LAYOUTS.get((kind, layers))
    if arch is None:
        known = ", ".join(f"{v} ({k[0]} {list(k[1])})" for k, v in _RESNET_LAYOUTS.items())
        raise CheckpointError(f"unrecognised ResNet layout: {kind} blocks {list(layers)}; known: {known}")
    method = _method_of(sd, "layer1.0.quan1.a")
    if not method:
        raise CheckpointError("ResNet state dict has no quantizer in 'layer1.0': not an N2UQ quantized model "
                              "(a full-precision checkpoint?)")
    quantize_downsample = any(re.search(r"downsample\.2\.", k) for k in sd)
    return _config(arch, quantize_downsample, num_classes, (sd, "layer1.0.quan1.a", method), recorded)


def _config(arch: str, quantize_downsample: bool, num_classes: int, quantizer, recorded: Dict[str, Any]) -> ModelConfig:
    sd, a_key, method = quantizer
    if method == "n2uq":
        n_bit = _bits_from_levels(sd[a_key].numel(), a_key)
    elif "n_bit" in recorded:
        n_bit = int(recorded["n_bit"])
    else:
        raise CheckpointError(f"a {method} model whose bit width the file does not record (its quantizers hold "
                              f"none); pass a checkpoint written by this project's training")
    if recorded and (recorded.get("method", method) != method or int(recorded.get("n_bit", n_bit)) != n_bit):
        raise CheckpointError(f"the file records {recorded.get('method')} at {recorded.get('n_bit')} bits but its "
                              f"weights are of a {method} model at {n_bit} bits")
    return ModelConfig(arch, n_bit, quantize_downsample, num_classes, method,
                       bool(recorded.get("learned_thresholds", True)), bool(recorded.get("entropy_preserving", True)),
                       bool(recorded.get("full_lr_thresholds", False)))


def load_model_state(path: str | os.PathLike[str]) -> Tuple[Dict[str, Tensor], ModelConfig, Dict[str, Any]]:
    """Read a checkpoint file and return ``(state_dict, config, metadata)``.

    ``metadata`` holds the file's other top-level entries (epoch, best_top1_acc, args, ...), when
    it is a dict. Every error is a :class:`CheckpointError` naming the file.
    """
    state_dict, meta = read_state_and_meta(path)
    try:
        config = infer_config(state_dict, meta)
    except CheckpointError as exc:
        raise CheckpointError(f"{os.fspath(path)}: {exc}") from None
    return state_dict, config, meta


def read_state_and_meta(path: str | os.PathLike[str]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """A checkpoint file's model state (``module.`` stripped) and its other top-level entries."""
    obj = read_checkpoint(path)
    state_dict = extract_state_dict(obj, source=os.fspath(path))
    meta: Dict[str, Any] = {}
    if isinstance(obj, Mapping):
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "model", "optimizer")}
    return state_dict, meta


def describe(config: Optional[ModelConfig]) -> str:
    """Human-readable one-liner of a configuration."""
    if config is None:
        return "unknown"
    if config.arch.startswith("resnet"):
        qd = "quantized downsample, " if config.quantize_downsample else "FP downsample, "
    else:
        qd = ""  # MobileNetV2 has no downsample branch
    method = "" if config.method_tag == "n2uq" else f"{config.method_tag}, "
    return f"{config.arch} W{config.n_bit}A{config.n_bit}, {method}{qd}{config.num_classes} classes"
