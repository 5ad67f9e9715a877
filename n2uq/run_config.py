"""The typed configuration of a training run, parsed once from the command line by :mod:`n2uq.cli`.

``resnet/train.py`` and ``mobilenetv2/train.py`` turn their flags into a :class:`TrainConfig`;
:func:`n2uq.engine.fit` and everything below it (trainer, loop, resume) read that, never the
argparse namespace. The field names are the flag names and the defaults are the flags' defaults
(the parser takes them from here), so ``TrainConfig.flags()`` is what a checkpoint records under
``args`` (docs/training.md) and :meth:`TrainConfig.from_flags` reads such a dictionary back.

Also here, because the command line checks them before anything heavy is imported: the data
folder layout (:func:`check_data_dir`, :func:`class_folders`) and its error, :class:`DataError`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["DataError", "check_data_dir", "class_folders", "check_same_classes", "class_difference", "check_classes",
           "DataConfig", "StudentConfig", "OptimConfig", "RunConfig", "TrainConfig"]


class DataError(ValueError):
    """The data directory is missing or not in the ``train/`` + ``val/`` ImageFolder layout."""


def check_data_dir(root: str) -> None:
    """Raise :class:`DataError` unless ``root`` holds ``train/`` and ``val/`` class folders."""
    if not os.path.exists(root):
        raise DataError(f"data directory not found: {root} (expected an ImageFolder tree with train/ and "
                        f"val/ inside; for a demo run scripts/prepare_demo_data.py)")
    if not os.path.isdir(root):
        raise DataError(f"data path is not a directory: {root}")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{root} has no {split}/ folder (expected {root}/train/<class>/*.jpg and "
                            f"{root}/val/<class>/*.jpg)")


#: The file name endings ``torchvision.datasets.ImageFolder`` takes for images (its ``IMG_EXTENSIONS``).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _has_image(folder: str) -> bool:
    """Whether ``folder`` (or a folder inside it, as ImageFolder searches) holds a file with an image
    ending. Stops at the first one: an ImageNet class folder is not listed whole."""
    subfolders = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                subfolders.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                return True
    return any(_has_image(path) for path in subfolders)


def class_folders(root: str, split: str) -> List[str]:
    """The class names of ``root/split`` as ``torchvision.datasets.ImageFolder`` finds them (its
    sub-folders, sorted), reading no image; none, or one without an image file (ImageFolder would
    refuse it), is a :class:`DataError`."""
    path = os.path.join(root, split)
    classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    if not classes:
        raise DataError(f"{path} has no class folder (expected {path}/<class>/<images>)")
    empty = [name for name in classes if not _has_image(os.path.join(path, name))]
    if empty:
        raise DataError(f"{path}: class folder(s) without an image ({', '.join(empty[:3])}"
                        f"{' ...' if len(empty) > 3 else ''}; image files end in {', '.join(IMAGE_EXTENSIONS)}); "
                        f"add their images or remove the folders")
    return classes


def check_same_classes(root: str, train_classes: Sequence[str], val_classes: Sequence[str]) -> None:
    """train/ and val/ must have the same class folders (a label means the same class in both)."""
    if list(train_classes) != list(val_classes):
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"{root}: train/ and val/ have different class folders (only in train/: "
                        f"{', '.join(only_train[:3]) or '-'}; only in val/: {', '.join(only_val[:3]) or '-'}); "
                        f"give both the same class folders")


def class_difference(trained: Sequence[str], now: Sequence[str], where: str = "the data") -> Optional[str]:
    """How the class folders ``now`` (of ``where``) differ from the ``trained`` ones a model's outputs
    stand for (label k is the k-th sorted folder), e.g. ``only in the checkpoint: cat; only in the
    data: kitten``; ``None`` when they are the same list."""
    if list(trained) == list(now):
        return None
    only_trained = sorted(set(trained) - set(now))
    only_now = sorted(set(now) - set(trained))
    if not only_trained and not only_now:
        return "the same names in another order"
    return (f"only in the checkpoint: {', '.join(only_trained[:3]) or '-'}{' ...' if len(only_trained) > 3 else ''}; "
            f"only in {where}: {', '.join(only_now[:3]) or '-'}{' ...' if len(only_now) > 3 else ''}")


def check_classes(classes: Sequence[str], folder: str, num_classes: int, meta: Mapping[str, Any]) -> None:
    """Raise :class:`DataError` unless the class folders of ``folder`` are the ones the model
    predicts: as many as its outputs, and the checkpoint's own class names when it records them
    (``meta['classes']``)."""
    if len(classes) != num_classes:
        raise DataError(f"{folder} has {len(classes)} classes but the checkpoint predicts {num_classes}")
    difference = class_difference(meta.get("classes") or classes, classes, folder)
    if difference:
        raise DataError(f"{folder}: class folders differ from the ones the checkpoint was trained on ({difference})")


@dataclass(frozen=True)
class DataConfig:
    """The images and how they are read (SPEC §6 transforms): ``--batch_size`` is global (all processes);
    ``workers`` ``None``: cores per process, at most 8."""

    data: str = "./data/imagenet"
    batch_size: int = 256
    image_size: int = 224
    val_resize: int = 256
    min_crop_scale: float = 0.08
    workers: Optional[int] = None
    skip_bad_images: bool = False


@dataclass(frozen=True)
class StudentConfig:
    """The trained model, its quantizers and its full-precision initialisation.

    ``quantize_downsample`` and ``full_precision`` are ``None`` when the script has no such flag
    (MobileNetV2); ``pretrained`` is resolved by the script (``auto`` becomes the paper's choice).
    ``full_lr_thresholds`` changes the optimizer's groups, not the model, but is recorded with the
    quantizers (:class:`~n2uq.methods.Quantizers`) so that its runs get their own folder and tag.
    """

    student: str = "resnet18"
    n_bit: int = 2
    quantize_downsample: Optional[bool] = None
    full_precision: Optional[bool] = None
    method: str = "n2uq"
    uniform_thresholds: bool = False
    maxabs_weights: bool = False
    full_lr_thresholds: bool = False
    pretrained: str = "auto"
    models_dir: str = "models"


@dataclass(frozen=True)
class OptimConfig:
    """What training minimises and how (SPEC §6): the loss (KD from ``teacher``, or label-smoothed CE
    without one), Adam (``momentum`` is beta1), the parameter groups and the linear schedule."""

    epochs: int = 128
    learning_rate: float = 1.25e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    alpha_group: str = "reference"
    pact_alpha_decay: Optional[float] = None
    teacher: str = "resnet101"
    teacher_weights: str = "imagenet"
    label_smooth: float = 0.1


@dataclass(frozen=True)
class RunConfig:
    """Where and how this invocation runs: the run folder's parent, resume, seed, device and numerics,
    budgets and checkpoints, fault handling and output."""

    save: str = "./models"
    resume: str = "auto"
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    epochs_per_run: int = 0
    steps_per_run: int = 0
    save_every_steps: int = 0
    skip_nonfinite: bool = False
    log_every: int = 50
    no_progress: bool = False
    check_only: bool = False
    debug: bool = False


_OPTIONAL_FLAGS = ("quantize_downsample", "full_precision")  # absent from a script without them


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, in four parts (each a frozen dataclass)."""

    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def flags(self) -> Dict[str, Any]:
        """``{flag name: value}`` of every flag the script has: what checkpoints record as ``args``."""
        out: Dict[str, Any] = {}
        for part in (self.data, self.student, self.optim, self.run):
            out.update(asdict(part))
        return {k: v for k, v in out.items() if not (k in _OPTIONAL_FLAGS and v is None)}

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> TrainConfig:
        """The configuration a ``{flag name: value}`` mapping describes (missing flags: their defaults).

        Accepts the parsed command line (``vars(namespace)``) and a checkpoint's ``args``; a name
        that is no flag is an error (a typo would otherwise be ignored).
        """
        parts = {f.name: f.default_factory for f in fields(cls)}  # type: ignore[misc]
        names = {name: {f.name for f in fields(kind)} for name, kind in parts.items()}
        unknown = sorted(set(values) - set().union(*names.values()))
        if unknown:
            raise ValueError(f"not a training flag: {', '.join(unknown)}")
        return cls(**{name: kind(**{k: values[k] for k in names[name] if k in values})
                      for name, kind in parts.items()})
