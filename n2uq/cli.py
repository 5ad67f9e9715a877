"""The shared training command line (the reference's flag names) and error handling for scripts.

Every script ends with ``run_main(main)``: a bad input becomes one line ``error: ...`` on stderr
and exit code 2 (usage) or 1 (runtime failure); ``--debug`` shows the traceback instead. The
inputs tried and the messages they give are listed in docs/reliability.md.

The training flags are parsed once into a :class:`~n2uq.run_config.TrainConfig`
(:func:`parse_train_config`), checked (:func:`validate_train_config`, and for ``--check_only``
:func:`check_run`), and only then do the scripts import the engine: this module imports nothing of
training, so ``--help`` and bad flags answer in about the time of ``import torch``.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable, List, Optional, Sequence

from n2uq.bitwidth import MAX_BITS, MIN_BITS, check_bits
from n2uq.distributed import env_world_size
from n2uq.methods import METHODS, Quantizers
from n2uq.recipe import PACT_ALPHA_DECAY
from n2uq.run_config import (
    DataConfig,
    DataError,
    OptimConfig,
    RunConfig,
    StudentConfig,
    TrainConfig,
    check_data_dir,
    check_same_classes,
    class_folders,
)

__all__ = ["UsageError", "OneLineParser", "parse_bool", "build_train_parser", "parse_train_config",
           "quantizers_from_config", "validate_train_config", "check_run", "check_ranges", "check_output_dir",
           "error_line", "run_main"]


class UsageError(ValueError):
    """A command-line value is invalid or inconsistent (exit code 2)."""


class OneLineParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line (what, and ``see --help``) with exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def parse_bool(value: str) -> bool:
    """``0/1/True/False`` (any case) → bool, as the reference's ``--quantize_downsample``."""
    v = str(value).strip().lower()
    if v in ("1", "true"):
        return True
    if v in ("0", "false"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0, 1, True or False, got {value!r}")


def _bits(value: str) -> int:
    """``--n_bit``: an integer checked by the quantizers' own rule (:func:`n2uq.bitwidth.check_bits`)."""
    try:
        return check_bits(int(value), "--n_bit")
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {value}") from None


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: ...)`` to a flag's help unless the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        return help_text if "(default" in help_text else super()._get_help_string(action)


_DATA, _STUDENT, _OPTIM, _RUN = DataConfig(), StudentConfig(), OptimConfig(), RunConfig()


def build_train_parser(archs: Sequence[str], default_arch: str, default_bits: int,
                       with_downsample: bool = True, prog: Optional[str] = None,
                       run_folder: str = "SAVE/<run name>/") -> OneLineParser:
    """The training flags; ``archs`` are the ``--student`` choices of the calling script, ``run_folder``
    says in ``--save``'s help where its checkpoints go. Defaults are those of :mod:`n2uq.run_config`.

    With ``with_downsample``, ``--quantize_downsample`` is absent from the parsed namespace unless
    given: the calling script decides its default (the reference's ``True``, ``False`` for a
    full-precision baseline).
    """
    p = OneLineParser(prog=prog, description="N2UQ quantization-aware training with the paper's recipe. "
                      "Defaults that differ from the reference's scripts: docs/reference_differences.md.",
                      formatter_class=_DefaultsHelpFormatter)
    g = p.add_argument_group("reference flags")
    g.add_argument("--data", default=_DATA.data, metavar="DIR", help="ImageFolder root with train/ and val/")
    g.add_argument("--batch_size", type=int, default=_DATA.batch_size,
                   help="global batch size (all processes together)")
    g.add_argument("--epochs", type=int, default=_OPTIM.epochs,
                   help="epoch e trains at lr*(1-(e+1)/epochs), so the last one at lr 0; at least 2")
    g.add_argument("--learning_rate", type=float, default=_OPTIM.learning_rate,
                   help="base lr (the alpha group uses lr/10)")
    g.add_argument("--momentum", type=float, default=_OPTIM.momentum, help="Adam beta1")
    g.add_argument("--weight_decay", type=float, default=_OPTIM.weight_decay,
                   help="weight decay of the 4-D weights group")
    g.add_argument("--save", default=_RUN.save,
                   help=f"checkpoints go to {run_folder}; also searched for the full-precision init files")
    g.add_argument("--label_smooth", type=float, default=_OPTIM.label_smooth,
                   help="label smoothing when there is no teacher")
    g.add_argument("--teacher", default=_OPTIM.teacher, help="torchvision model name, or none")
    g.add_argument("--student", default=default_arch, choices=list(archs), help="the architecture to train")
    g.add_argument("--n_bit", type=_bits, default=default_bits, help="weight and activation bits, 1..8")
    if with_downsample:
        g.add_argument("--quantize_downsample", type=parse_bool, default=argparse.SUPPRESS,
                       help="quantize the 1x1 shortcut convs (0/1/True/False; default: True, as in the reference; "
                            "False with --full_precision)")
    g.add_argument("-j", "--workers", type=int, default=_DATA.workers,
                   help="data loading workers per process (default: cores per process, at most 8)")

    g = p.add_argument_group("quantizers (only they differ between methods: docs/comparison.md)")
    g.add_argument("--method", choices=METHODS, default=_STUDENT.method,
                   help="n2uq (LTQ + entropy-preserving weights), or a compared method: lsq, pact (DoReFa "
                        "weights, as in its paper), dorefa")
    g.add_argument("--uniform_thresholds", action="store_true",
                   help="N2UQ ablation: every LTQ's intervals frozen at the uniform grid (uniform thresholds)")
    g.add_argument("--maxabs_weights", action="store_true",
                   help="N2UQ ablation: weight scale max|W| instead of the L1 entropy-preserving scale")
    g.add_argument("--full_lr_thresholds", action="store_true",
                   help="N2UQ variant, not the reference's recipe: every LTQ interval length 'a' trains at the full "
                        "lr (the reference trains the ResNets' quan1.a/quan2.a at lr/10); the opposite of "
                        "--alpha_group all_ltq")
    g.add_argument("--pact_alpha_decay", type=float, default=_OPTIM.pact_alpha_decay,
                   help=f"--method pact: L2 weight decay on the clipping levels alpha (default: {PACT_ALPHA_DECAY})")

    g = p.add_argument_group("engine")
    g.add_argument("--teacher_weights", default=_OPTIM.teacher_weights, help="imagenet | FILE | none (none: no KD)")
    g.add_argument("--pretrained", default=_STUDENT.pretrained,
                   help="full-precision init: auto (the paper's choice: torchvision's weights with a full-precision "
                        "downsample, the authors' files otherwise) | torchvision | authors | none | FILE")
    g.add_argument("--models_dir", default=_STUDENT.models_dir,
                   help="where the full-precision init files are kept (--save is searched too, as the reference "
                        "does; missing authors' files are fetched into this folder)")
    g.add_argument("--alpha_group", choices=("reference", "all_ltq"), default=_OPTIM.alpha_group,
                   help="reference name rules, or every LTQ 'a' in the lr/10 group (--full_lr_thresholds: every "
                        "'a' at the full lr)")
    g.add_argument("--image_size", type=int, default=_DATA.image_size, help="train crop and val crop size")
    g.add_argument("--val_resize", type=int, default=_DATA.val_resize,
                   help="validation resize before the center crop")
    g.add_argument("--min_crop_scale", type=float, default=_DATA.min_crop_scale, help="RandomResizedCrop lower scale")
    g.add_argument("--seed", type=int, default=_RUN.seed,
                   help="seeds the initial weights, the data order and every augmentation (same seed, same run)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default=_RUN.amp,
                   help="mixed precision: autocast to bfloat16 or float16 (fp16 needs CUDA and adds a loss scaler)")
    g.add_argument("--channels_last", action="store_true",
                   help="channels-last memory format for the models and the images (often faster on GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the student")
    g.add_argument("--resume", default=_RUN.resume, help="auto (the run's checkpoint if it exists) | none | FILE")
    g.add_argument("--epochs_per_run", type=int, default=_RUN.epochs_per_run,
                   help="stop this invocation after N epochs (0: run to --epochs); resume continues")
    g.add_argument("--steps_per_run", type=int, default=_RUN.steps_per_run,
                   help="stop this invocation after N optimizer steps (0: no limit), with a checkpoint")
    g.add_argument("--save_every_steps", type=int, default=_RUN.save_every_steps,
                   help="also write a mid-epoch checkpoint every N steps (0: only at epoch ends)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=_RUN.device,
                   help="auto: this process's GPU when CUDA is available, else the CPU")
    g.add_argument("--threads", type=int, default=_RUN.threads, help="CPU threads per process (0: cores / processes)")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="skip unreadable images (counted in the logs) instead of stopping with their path")
    g.add_argument("--skip_nonfinite", action="store_true",
                   help="skip a batch whose loss is NaN/inf (counted) instead of stopping the run")
    g.add_argument("--log_every", type=int, default=_RUN.log_every, help="TensorBoard train scalars every N steps")
    g.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--check_only", action="store_true",
                   help="check the flags, the data's class folders and the teacher against them, say what was "
                        "checked, and exit")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def parse_train_config(parser: argparse.ArgumentParser, argv: Optional[List[str]],
                       resolve: Optional[Callable[[argparse.Namespace], None]] = None) -> TrainConfig:
    """Parse ``argv`` once into a :class:`~n2uq.run_config.TrainConfig`; ``resolve(namespace)`` first
    fills in what the calling script decides (its ``--quantize_downsample`` default, ``--pretrained auto``)."""
    args = parser.parse_args(argv)
    if resolve is not None:
        resolve(args)
    return TrainConfig.from_flags(vars(args))


def quantizers_from_config(student: StudentConfig) -> Quantizers:
    """The quantizers the flags ask for; a flag that does not apply to ``--method`` is a usage error."""
    if student.method != "n2uq":
        for flag in ("uniform_thresholds", "maxabs_weights", "full_lr_thresholds"):
            if getattr(student, flag):
                raise UsageError(f"--{flag} is an ablation of N2UQ; it does not apply to --method {student.method}")
    if student.method == "lsq" and student.n_bit < 2:
        raise UsageError("--method lsq needs --n_bit 2 or more (its signed 1-bit weight grid is empty)")
    if student.method == "pact" and student.n_bit < 2:
        raise UsageError("--method pact needs --n_bit 2 or more (its 1-bit levels are 0 and the clip alpha, which "
                         "starts at 10 as in its paper, so every activation below 5 quantizes to 0, the layers' "
                         "outputs are constant and the gradients overflow through BatchNorm)")
    if student.full_lr_thresholds and student.uniform_thresholds:
        raise UsageError("--full_lr_thresholds sets the lr of the interval lengths, which --uniform_thresholds "
                         "freezes; pass one of them")
    return Quantizers(student.n_bit, student.method, learned_thresholds=not student.uniform_thresholds,
                      entropy_preserving=not student.maxabs_weights, full_lr_thresholds=student.full_lr_thresholds)


def check_ranges(positive: Optional[dict] = None, non_negative: Optional[dict] = None) -> None:
    """Raise :class:`UsageError` for the first flag out of range; ``None`` values (unset) pass."""
    for flag, value in (positive or {}).items():
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    for flag, value in (non_negative or {}).items():
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")


def check_output_dir(path: str, flag: str) -> None:
    """``path`` must be a folder (or creatable as one) that this process can write into."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file, not a folder; pass a folder")
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent.rstrip(os.sep)) or "."
    if parent != path and not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder, so no folder can be made inside it; "
                         f"pass a folder")
    if not os.access(parent or ".", os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write into {parent or '.'} (permission denied); "
                         f"pass a folder you can write to")


def validate_train_config(cfg: TrainConfig, world_size: Optional[int] = None) -> Quantizers:
    """Cross-flag checks argparse cannot do; raises :class:`UsageError` / :class:`DataError`.

    Returns the quantizers the flags ask for (:func:`quantizers_from_config`)."""
    world_size = env_world_size() if world_size is None else world_size
    data, optim, run = cfg.data, cfg.optim, cfg.run
    quantizers = quantizers_from_config(cfg.student)
    if cfg.student.full_lr_thresholds and optim.alpha_group == "all_ltq":
        raise UsageError("--alpha_group all_ltq puts every interval length at lr/10 and --full_lr_thresholds at the "
                         "full lr; pass one of them")
    if optim.pact_alpha_decay is not None and cfg.student.method != "pact":
        raise UsageError(f"--pact_alpha_decay applies to --method pact only (not {cfg.student.method})")
    check_data_dir(data.data)
    check_ranges({"--batch_size": data.batch_size, "--epochs": optim.epochs, "--image_size": data.image_size,
                  "--val_resize": data.val_resize, "--learning_rate": optim.learning_rate,
                  "--log_every": run.log_every},
                 {"--pact_alpha_decay": optim.pact_alpha_decay, "--workers": data.workers,
                  "--epochs_per_run": run.epochs_per_run, "--steps_per_run": run.steps_per_run,
                  "--save_every_steps": run.save_every_steps, "--threads": run.threads,
                  "--weight_decay": optim.weight_decay})
    if optim.epochs == 1:
        raise UsageError("--epochs 1 would train its only epoch at lr 0 and learn nothing (epoch e trains at "
                         "lr*(1-(e+1)/epochs), so the last one always at lr 0); pass --epochs 2 or more (for a "
                         "one-epoch try: --epochs 2 --epochs_per_run 1, which trains at half the lr)")
    if data.batch_size % world_size:
        raise UsageError(f"--batch_size {data.batch_size} is not divisible by the {world_size} processes; "
                         f"use a multiple of {world_size}")
    if data.val_resize < data.image_size:
        raise UsageError(f"--val_resize {data.val_resize} is smaller than --image_size {data.image_size}")
    if not 0.0 <= optim.label_smooth < 1.0:
        raise UsageError(f"--label_smooth must be in [0, 1), got {optim.label_smooth}")
    if not 0.0 < data.min_crop_scale <= 1.0:
        raise UsageError(f"--min_crop_scale must be in (0, 1], got {data.min_crop_scale}")
    if not 0.0 <= optim.momentum < 1.0:
        raise UsageError(f"--momentum (Adam beta1) must be in [0, 1), got {optim.momentum}")
    if run.amp == "fp16" and (run.device == "cpu" or (run.device == "auto" and not _cuda_available())):
        raise UsageError("--amp fp16 needs CUDA" + (" (--device auto found none)" if run.device == "auto" else "")
                         + "; use --amp bf16 on CPU")
    if optim.teacher == "none" and optim.teacher_weights not in ("imagenet", "none"):
        raise UsageError(f"--teacher none conflicts with --teacher_weights {optim.teacher_weights}; "
                         f"name the teacher's architecture with --teacher, or drop --teacher_weights")
    from n2uq.teacher import unknown_teacher  # torchvision: only once the flags parsed

    teacher_problem = unknown_teacher(optim.teacher, optim.teacher_weights)
    if teacher_problem:
        raise UsageError(teacher_problem)
    if run.resume not in ("auto", "none") and not os.path.isfile(run.resume):
        raise UsageError(f"--resume file not found: {run.resume} (use auto, none or an existing checkpoint)")
    pretrained = cfg.student.pretrained
    if pretrained not in ("auto", "torchvision", "authors", "none") and not os.path.isfile(pretrained):
        raise UsageError(f"--pretrained file not found: {pretrained} "
                         f"(use auto, torchvision, authors, none or an existing file)")
    check_output_dir(run.save, "--save")
    return quantizers


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_run(cfg: TrainConfig, model: str, run_dir: str, world_size: Optional[int] = None) -> List[str]:
    """``--check_only``, after :func:`validate_train_config`: check the data's class folders and the
    teacher against their number, and return the lines that say what was checked (``model``
    describes the student, ``run_dir`` is where its checkpoints go). Nothing is written."""
    from n2uq.teacher import check_teacher  # torchvision: only when checking

    world_size = env_world_size() if world_size is None else world_size
    data, optim = cfg.data, cfg.optim
    classes = class_folders(data.data, "train")
    check_same_classes(data.data, classes, class_folders(data.data, "val"))
    teacher = check_teacher(optim.teacher, optim.teacher_weights, len(classes))
    loss = (f"KD from {teacher}" if teacher != "none"
            else f"no teacher: label-smoothed cross-entropy (epsilon {optim.label_smooth})")
    return ["checked, nothing trained or written:",
            f"  flags: {model}, {optim.epochs} epochs, batch {data.batch_size} ({data.batch_size // world_size} "
            f"per process, {world_size} process(es)), lr {optim.learning_rate:g}",
            f"  data: {data.data}: {len(classes)} classes, the same class folders in train/ and val/",
            f"  loss: {loss}",
            f"  checkpoints: {run_dir} (--save is writable)"]


_USAGE_ERRORS = (UsageError, DataError)
# CheckpointError, PretrainedError and TeacherError are RuntimeErrors (not imported here: --help stays light).
_RUNTIME_ERRORS = (OSError, RuntimeError, ValueError)


def error_line(exc: BaseException) -> str:
    """The one-line message for ``exc``: its text on one line; OS errors with the file and a hint."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on the device{where}: free some space or write elsewhere, then run again"
        return f"{exc.strerror}{where}"
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def run_main(main: Callable[[Optional[List[str]]], Optional[int]], argv: Optional[List[str]] = None) -> None:
    """Call ``main(argv)`` and exit: 0 on success, 2 on usage errors, 1 on runtime errors.

    Errors print ``error: <message>`` on one line (on every rank under torchrun, prefixed with the
    rank when there are several); with ``--debug`` in ``argv`` the exception propagates with its
    traceback. Ctrl-C outside the training loop (which saves and stops on its own) exits 130.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = main(argv)
    except BaseException as exc:
        if "--debug" in argv or isinstance(exc, SystemExit):
            raise
        if isinstance(exc, KeyboardInterrupt):
            sys.stderr.write("interrupted\n")
            sys.exit(130)
        if not isinstance(exc, (*_USAGE_ERRORS, *_RUNTIME_ERRORS)):
            raise
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and env_world_size() > 1 else ""
        sys.stderr.write(f"{prefix}error: {error_line(exc)}\n")
        sys.exit(2 if isinstance(exc, _USAGE_ERRORS) else 1)
    sys.exit(code or 0)
