"""Full-precision initialisation before quantization-aware training (docs/SPEC.md, training recipe).

Sources (``--pretrained``):

* ``torchvision`` — torchvision's ImageNet weights (``IMAGENET1K_V1``) of the same ResNet: the file
  (``resnet18-f37072fd.pth``, ...) from ``--models_dir`` or ``--save`` when it is there, else from
  the torch hub cache (downloaded once);
* ``authors`` — the authors' full-precision files (:data:`AUTHORS_FILES`), looked for in
  ``--models_dir`` and, as the reference does, in ``--save``, else fetched with gdown into
  ``--models_dir``;
* a path to a state-dict file;
* ``none`` — random init.

Only keys that exist in the model with the same shape are copied. The torchvision layout's
shortcut ``downsample.0`` (conv) / ``downsample.1`` (BN) becomes ``downsample.1`` / ``downsample.2``
in the quantized-downsample layout (``downsample.0`` is an LTQ there). Unlike the reference
(``strict=False``, silent), a report of loaded and left-at-init keys is always produced, and a file
that does not initialise this architecture is an error: it must hold every convolution weight of
the model with the model's shape; only the classifier (the last ``nn.Linear``) may differ in its
number of outputs (a file trained on another number of classes), and the quantizers' parameters,
which a full-precision file cannot have, stay at their initial values.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from n2uq.checkpoint import CheckpointError, extract_state_dict, read_checkpoint

__all__ = ["PretrainedError", "AUTHORS_FILES", "TORCHVISION_WEIGHTS", "LoadReport", "authors_file", "find_file",
           "fetch_authors_file", "fetch_torchvision_weights", "torchvision_state_dict", "remap_torchvision_downsample",
           "load_matching", "load_pretrained"]


class PretrainedError(RuntimeError):
    """The requested initialisation could not be found, fetched or applied."""


#: (arch, quantize_downsample) -> (file name in models/, Google Drive id) — docs/SPEC.md, training recipe.
AUTHORS_FILES: Dict[Tuple[str, bool], Tuple[str, str]] = {
    ("resnet18", True): ("real_res18.pth.tar", "1BfWhr1hzaS_5zHpQDREVRiPOCmXEWC7q"),
    ("resnet34", True): ("real_res34.pth.tar", "1kvrloDtpJjhgyF4bX0z0CvHFeCKOHj_B"),
    ("resnet50", True): ("real_res50.pth.tar", "1cySVFj5PV0ngJlvLmNRcIufzOLRF_ut0"),
    ("resnet18", False): ("resnet18-f37072fd.pth", "1DhnwgWsAYOTIrTJLaMkT7FQD7oHXMz41"),
    ("resnet34", False): ("resnet34-b627a593.pth", "1kbQfXr4YS9XsboYV_-nG4kVHe9MVk5N1"),
    ("resnet50", False): ("resnet50-0676ba61.pth", "1IVYC2ngycFWAZlUtOPAdahZbzAwgX6VU"),
    ("mobilenetv2", False): ("real_mbv2.pth.tar", "1Rbf8jQuisuLdKB9Cfth962I2RBCwm-Gu"),
}

#: arch -> torchvision weights enum name (IMAGENET1K_V1, the files the reference used).
TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
}


@dataclass
class LoadReport:
    """What an initialisation did: keys copied, model keys left at init, file keys not used."""

    source: str
    loaded: List[str] = field(default_factory=list)
    left_at_init: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    shape_mismatch: List[str] = field(default_factory=list)
    remapped: int = 0

    def summary(self) -> str:
        """A few lines: counts, and the left-at-init / unused keys grouped by their last name part."""
        total = len(self.loaded) + len(self.left_at_init)
        lines = [f"pretrained init from {self.source}: loaded {len(self.loaded)}/{total} model tensors"
                 + (f" ({self.remapped} remapped from the torchvision downsample layout)" if self.remapped else "")]
        lines.append(f"  left at init ({len(self.left_at_init)}): {_group(self.left_at_init)}")
        if self.shape_mismatch:
            lines.append(f"  skipped, shape differs ({len(self.shape_mismatch)}): {', '.join(self.shape_mismatch[:6])}"
                         + (" ..." if len(self.shape_mismatch) > 6 else ""))
        if self.unused:
            lines.append(f"  in the file but not in the model ({len(self.unused)}): {_group(self.unused)}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"source": self.source, "loaded": self.loaded, "left_at_init": self.left_at_init,
                "unused": self.unused, "shape_mismatch": self.shape_mismatch, "remapped": self.remapped}


def _group(keys: List[str]) -> str:
    """``'*.a' x16, '*.bias' x40, ...`` — keys counted by their last dotted component."""
    if not keys:
        return "none"
    counts = Counter(k.rsplit(".", 1)[-1] for k in keys)
    return ", ".join(f"*.{name} x{n}" for name, n in counts.most_common())


def authors_file(arch: str, quantize_downsample: bool, models_dir: str) -> Tuple[str, str]:
    """``(local path, gdown id)`` of the authors' init file for this configuration."""
    key = (arch, bool(quantize_downsample) and arch != "mobilenetv2")
    if key not in AUTHORS_FILES:
        raise PretrainedError(f"no authors' full-precision file is known for {arch} "
                              f"(quantize_downsample={quantize_downsample})")
    name, file_id = AUTHORS_FILES[key]
    return os.path.join(models_dir, name), file_id


def find_file(name: str, folders: Sequence[Optional[str]]) -> Optional[str]:
    """``folder/name`` for the first of ``folders`` holding a non-empty file of that name, else ``None``."""
    for folder in folders:
        if folder is None:
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            return path
    return None


class _FetchFailed(Exception):
    """gdown gave no file; the message is the reason."""


def _gdown(file_id: str, path: str) -> None:
    """Download Google Drive file ``file_id`` to ``path`` (through ``path.part``), or raise :class:`_FetchFailed`.

    What came back replaces ``path`` only when the project's checkpoint reader reads it (Google Drive
    answers a quota or sign-in problem with an HTML page); otherwise the ``.part`` file is deleted."""
    tmp = path + ".part"
    try:
        import gdown

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        out = gdown.download(id=file_id, output=tmp, quiet=True)
        if not out or not os.path.isfile(tmp) or os.path.getsize(tmp) == 0:
            raise OSError("gdown returned no file")
    except Exception as exc:  # gdown raises many kinds (network, quota, HTML pages)
        _remove(tmp)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _FetchFailed(reason) from None
    problem = _not_a_checkpoint(tmp)
    if problem is not None:
        _remove(tmp)
        raise _FetchFailed(problem)
    os.replace(tmp, path)


def _not_a_checkpoint(path: str) -> Optional[str]:
    """Why the downloaded file ``path`` is no checkpoint (what came back instead), or ``None`` when
    :func:`~n2uq.checkpoint.read_checkpoint` reads it."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    size = os.path.getsize(path)
    if head.startswith(b"<"):  # an HTML or XML page
        return (f"Google Drive sent a {size}-byte web page, not the file (a download quota, sign-in or error "
                f"page)")
    try:
        read_checkpoint(path)
    except CheckpointError as exc:
        return f"the {size}-byte download is not a readable checkpoint ({str(exc).splitlines()[0].rstrip('.')})"
    return None


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def fetch_authors_file(arch: str, quantize_downsample: bool, models_dir: str) -> str:
    """The local path of the authors' file, downloading it with gdown when it is missing."""
    path, file_id = authors_file(arch, quantize_downsample, models_dir)
    if find_file(os.path.basename(path), [models_dir]) is not None:
        return path
    try:
        _gdown(file_id, path)
    except _FetchFailed as exc:
        raise PretrainedError(f"could not fetch {os.path.basename(path)} ({exc}); download "
                              f"https://drive.google.com/uc?id={file_id} by hand and save it as {path} "
                              f"(models/README.md)") from None
    return path


def _places(models_dir: str, save_dir: Optional[str]) -> str:
    """``models (--models_dir)`` and, when it is another folder, ``nor in X (--save)``."""
    if save_dir is None or os.path.realpath(save_dir) == os.path.realpath(models_dir):
        return f"{models_dir} (--models_dir, also --save)" if save_dir is not None else f"{models_dir} (--models_dir)"
    return f"{models_dir} (--models_dir) nor in {save_dir} (--save)"


def _authors_path(arch: str, quantize_downsample: bool, models_dir: str, save_dir: Optional[str]) -> str:
    """The authors' file from ``models_dir`` or ``save_dir``, else fetched into ``models_dir``."""
    path, file_id = authors_file(arch, quantize_downsample, models_dir)
    name = os.path.basename(path)
    found = find_file(name, [models_dir, save_dir])
    if found is not None:
        return found
    try:
        _gdown(file_id, path)
    except _FetchFailed as exc:
        qd = "" if arch == "mobilenetv2" else f" --quantize_downsample {int(bool(quantize_downsample))}"
        raise PretrainedError(
            f"{name} is not in {_places(models_dir, save_dir)}, and fetching it failed ({exc}); fetch it with "
            f"`python scripts/download_pretrained.py --arch {arch}{qd} --models_dir {models_dir}` (or download "
            f"https://drive.google.com/uc?id={file_id} by hand into one of these folders: models/README.md), or pass "
            f"--pretrained none"
        ) from None
    return path


def fetch_torchvision_weights(weights, alternatives: str) -> Dict[str, Tensor]:
    """The state dict of a torchvision ``WeightsEnum`` entry, from the torch hub cache or downloaded.

    On failure raises :class:`PretrainedError` naming the file, where to put it and ``alternatives``
    (the flags that avoid the download).
    """
    file = os.path.basename(weights.url)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torch.hub's "Downloading: ..." line
            return dict(weights.get_state_dict(progress=False))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretrainedError(
            f"cannot get torchvision weights {weights} ({reason}); put {file} into $TORCH_HOME/hub/checkpoints/ "
            f"(default ~/.cache/torch/hub/checkpoints/) from {weights.url}, or pass {alternatives}"
        ) from None


def torchvision_state_dict(arch: str, alternatives: str = "--pretrained PATH or none") -> Dict[str, Tensor]:
    """torchvision's ImageNet weights for ``arch`` (downloaded into the torch hub cache once)."""
    if arch not in TORCHVISION_WEIGHTS:
        raise PretrainedError(f"torchvision has no weights in the N2UQ layout of {arch}; use "
                              f"--pretrained authors, a file path, or none")
    from torchvision.models import get_weight

    return fetch_torchvision_weights(get_weight(TORCHVISION_WEIGHTS[arch]), alternatives)


_TV_DOWNSAMPLE = re.compile(r"^(.*\.downsample)\.([01])\.(.+)$")


def remap_torchvision_downsample(state_dict: Mapping[str, Tensor],
                                 model_keys: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], int]:
    """Shift ``downsample.0/1`` to ``downsample.1/2`` when the model has the quantized layout.

    Applied only when the model has ``*.downsample.2.*`` keys and the file has none (i.e. the file
    is in torchvision's ``conv, BN`` layout). Returns ``(state_dict, number of keys renamed)``.
    """
    model_qd = any(".downsample.2." in k for k in model_keys)
    file_tv = any(".downsample.1." in k for k in state_dict) and not any(".downsample.2." in k for k in state_dict)
    if not (model_qd and file_tv):
        return dict(state_dict), 0
    out, renamed = {}, 0
    for key, value in state_dict.items():
        m = _TV_DOWNSAMPLE.match(key)
        if m:
            key, renamed = f"{m.group(1)}.{int(m.group(2)) + 1}.{m.group(3)}", renamed + 1
        out[key] = value
    return out, renamed


def load_matching(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> LoadReport:
    """Copy every entry whose key and shape match a model entry; report the rest.

    Raises :class:`PretrainedError` when nothing matched (a wrong file must not pass silently).
    """
    own = model.state_dict()
    state_dict, renamed = remap_torchvision_downsample(state_dict, own)
    report = LoadReport(source=source, remapped=renamed)
    usable = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unused.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.shape_mismatch.append(f"{key} file {list(value.shape)} vs model {list(own[key].shape)}")
        else:
            usable[key] = value
    report.loaded = [k for k in own if k in usable]
    report.left_at_init = [k for k in own if k not in usable]
    if not usable:
        raise PretrainedError(f"{source}: no key of the file matches the model (e.g. file has "
                              f"{next(iter(state_dict), 'nothing')!r}, model has {next(iter(own))!r}); "
                              f"wrong file for this architecture?")
    _check_covers_weights(model, own, usable, state_dict, source)
    model.load_state_dict(usable, strict=False)
    return report


def _check_covers_weights(model: nn.Module, own: Mapping[str, Tensor], usable: Mapping[str, Tensor],
                          state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise :class:`PretrainedError` unless the file's convolution and linear weights (``*.weight``
    of two or more dimensions) are the model's: ``usable`` (the file's entries that fit) holds every
    one of the model's, and the file has none the model lacks (a deeper or wider architecture). The
    classifier (the model's last ``nn.Linear``) may have another number of outputs in the file
    (another class count); it then stays at its initial value."""
    classifier = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    weights = [k for k, v in own.items() if k.endswith(".weight") and v.dim() >= 2]
    other_classes = [k for k in weights if k.rsplit(".", 1)[0] in classifier and k in state_dict
                     and tuple(state_dict[k].shape[1:]) == tuple(own[k].shape[1:])]
    missing = [k for k in weights if k not in usable and k not in other_classes]
    extra = [k for k, v in state_dict.items() if k.endswith(".weight") and v.dim() >= 2 and k not in own]
    if not missing and not extra:
        return
    covered = sum(k in usable for k in weights)
    problems = (("shape differs", [k for k in missing if k in state_dict]),
                ("not in the file", [k for k in missing if k not in state_dict]), ("not in the model", extra))
    raise PretrainedError(
        f"{source} does not initialise this model: it fits {covered} of its {len(weights)} convolution/linear "
        f"weights ({len(usable)}/{len(own)} tensors in all; "
        + "; ".join(f"{what} ({len(keys)}): {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                    for what, keys in problems if keys)
        + "); pass a full-precision file of this architecture, or --pretrained none")


def load_pretrained(model: nn.Module, source: str, arch: str, quantize_downsample: bool,
                    models_dir: str = "models", save_dir: Optional[str] = None) -> Optional[LoadReport]:
    """Initialise ``model`` from ``source`` (torchvision | authors | PATH | none); ``None`` for none.

    Files named as the reference names them are looked for in ``models_dir`` and ``save_dir``
    (``--save``, where the reference keeps them).
    """
    if source == "none":
        return None
    if source == "torchvision":
        local = None
        if arch in TORCHVISION_WEIGHTS:
            local = find_file(AUTHORS_FILES[(arch, False)][0], [models_dir, save_dir])
        if local is None:
            places = models_dir if save_dir is None else f"{models_dir} or {save_dir}"
            alternatives = f"--pretrained PATH or none (or put the file into {places})"
            return load_matching(model, torchvision_state_dict(arch, alternatives),
                                 f"torchvision {TORCHVISION_WEIGHTS.get(arch)}")
        source = local
    path = _authors_path(arch, quantize_downsample, models_dir, save_dir) if source == "authors" else source
    if not os.path.exists(path):
        raise PretrainedError(f"--pretrained file not found: {path} (use torchvision, authors, none or an "
                              f"existing file)")
    try:
        state_dict = extract_state_dict(read_checkpoint(path), source=path)
    except CheckpointError as exc:
        raise PretrainedError(str(exc)) from None
    return load_matching(model, state_dict, path)
