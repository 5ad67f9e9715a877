"""Evaluate a checkpoint: top-1 / top-5 on an ImageFolder validation split.

    python scripts/evaluate.py --checkpoint models/resnet18_2bit_quantize_downsample_False/model_best.pth.tar \\
        --data /path/to/imagenet
    torchrun --nproc_per_node=8 scripts/evaluate.py --checkpoint CKPT --data DIR     # sharded, same numbers

The architecture, bit width, quantization method (N2UQ, LSQ, PACT, DoReFa-Net, N2UQ's ablations),
downsample kind and class count are read from the checkpoint (``n2uq.checkpoint.infer_config``:
its state dict, and the choices this project's checkpoints record); the weights are loaded strictly. A torchvision
ResNet state dict (the ``--full_precision`` baseline, or torchvision's weights) is evaluated as
that full-precision model. Image size, resize and AMP are what the training run used (stored in
the checkpoint), as the result line says; ``--image_size``/``--val_resize``/``--amp`` are for files
that record none (else 224/256/none), and one that contradicts the file is refused: a number is
never printed for preprocessing other than the model's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()

from torch import Tensor, nn  # noqa: E402

from n2uq import data as D  # noqa: E402
from n2uq.checkpoint import (  # noqa: E402
    CheckpointError,
    describe,
    infer_config,
    load_state_dict_strict,
    read_state_and_meta,
)
from n2uq.cli import OneLineParser, UsageError, check_ranges, run_main  # noqa: E402
from n2uq.distributed import cleanup, init_distributed  # noqa: E402
from n2uq.engine import configure_threads, default_workers, evaluate  # noqa: E402
from n2uq.run_config import check_classes  # noqa: E402
from scripts.model_zoo import (  # noqa: E402
    build_full_precision,
    build_model,
    evaluation_sizes,
    full_precision_resnet,
    training_args,
)


class Settings(NamedTuple):
    """How a checkpoint is evaluated: center crop, resize before it, autocast."""

    image_size: int
    val_resize: int
    amp: str

    def describe(self) -> str:
        amp = "" if self.amp == "none" else f", {self.amp} autocast"
        return f"crop {self.image_size} after resize {self.val_resize}{amp}"


def evaluation_settings(meta: Dict[str, Any], image_size: Optional[int] = None, val_resize: Optional[int] = None,
                        amp: Optional[str] = None) -> Settings:
    """What the checkpoint's training recorded (``meta['args']``); the given values only where it
    records none, else 224 / 256 / none. A given value that contradicts the file raises
    :class:`UsageError` naming the flag."""
    recorded = training_args(meta)
    for flag, name, given in (("--image_size", "image_size", image_size), ("--val_resize", "val_resize", val_resize),
                              ("--amp", "amp", amp)):
        if given is not None and name in recorded and str(recorded[name]) != str(given):
            raise UsageError(f"was trained with {name} {recorded[name]}, but {flag} {given} was given; leave {flag} "
                             f"out to evaluate it as trained (the flag is for files that record no {name})")
    image_size, val_resize = evaluation_sizes(meta, image_size, val_resize)
    if val_resize < image_size:
        raise UsageError(f"resize {val_resize} is smaller than the crop {image_size} (--val_resize, --image_size)")
    return Settings(image_size, val_resize, amp or str(recorded.get("amp", "none")))


def add_settings_flags(p: OneLineParser) -> None:
    """``--image_size``, ``--val_resize``, ``--amp``: for files that record none (:func:`evaluation_settings`)."""
    p.add_argument("--image_size", type=int, default=None,
                   help="center crop, for a file that records none (default 224; else the training run's)")
    p.add_argument("--val_resize", type=int, default=None,
                   help="resize before the crop, for a file that records none (default 256; else training's)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                   help="autocast, for a file that records none (default none; else the training run's)")


def check_settings_flags(args) -> None:
    """Those flags and ``--batch_size``, ``--workers``, ``--threads`` in range, before any file is read."""
    check_ranges({"--batch_size": args.batch_size, "--image_size": args.image_size, "--val_resize": args.val_resize},
                 {"--workers": args.workers, "--threads": args.threads})
    if args.image_size and args.val_resize and args.val_resize < args.image_size:
        raise UsageError(f"--val_resize {args.val_resize} is smaller than --image_size {args.image_size}")
    if args.amp == "fp16" and args.device == "cpu":
        raise UsageError("--amp fp16 needs CUDA; use --amp bf16 on CPU")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="evaluate.py", description="Top-1/top-5 of an N2UQ checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (ours, or a released N2UQ one)")
    p.add_argument("--data", required=True, help="ImageFolder root holding the split folder (val/)")
    p.add_argument("--split", default="val", help="sub-folder of --data to evaluate")
    p.add_argument("--batch_size", type=int, default=256, help="global batch size")
    p.add_argument("-j", "--workers", type=int, default=None, help="loader workers per process")
    add_settings_flags(p)
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: cores / processes)")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="leave unreadable images out (reported, and not counted) instead of stopping")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line instead")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def _read(path: str) -> Tuple[Dict[str, Tensor], Tuple[str, str, int, Callable[[], nn.Module]], Dict[str, Any]]:
    """State dict, ``(tag, description, classes, model factory)`` and the file's other entries."""
    state_dict, meta = read_state_and_meta(path)
    try:
        config = infer_config(state_dict, meta)
    except CheckpointError as exc:
        full_precision = full_precision_resnet(state_dict)
        if full_precision is None:
            either = ("; nor is it exactly a torchvision ResNet-18/34/50 (a full-precision baseline)"
                      if "fc.weight" in state_dict and not any(".quan" in k for k in state_dict) else "")
            raise CheckpointError(f"{path}: {exc}{either}") from None
        arch, classes = full_precision
        return state_dict, (f"{arch}_fp", f"{arch} full precision (torchvision), {classes} classes", classes,
                            lambda: build_full_precision(arch, classes)), meta
    return state_dict, (config.tag, describe(config), config.num_classes, lambda: build_model(config)), meta


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"checkpoint not found: {args.checkpoint} (pass an existing .pth.tar file)")
    split_dir = os.path.join(args.data, args.split)
    if not os.path.isdir(split_dir):
        raise D.DataError(f"no {args.split}/ folder in {args.data} (expected {split_dir}/<class>/<images>)")
    check_settings_flags(args)
    state_dict, (tag, description, num_classes, make_model), meta = _read(args.checkpoint)
    try:
        settings = evaluation_settings(meta, args.image_size, args.val_resize, args.amp)
    except UsageError as exc:
        raise UsageError(f"{args.checkpoint}: {exc}") from None

    dataset = D.image_folder(args.data, args.split, D.val_transform(settings.image_size, settings.val_resize))
    check_classes(dataset.classes, split_dir, num_classes, meta)

    env = init_distributed(args.device)
    try:
        configure_threads(args.threads, env)
        model = make_model()
        load_state_dict_strict(model, state_dict, source=args.checkpoint)
        model.to(env.device)
        if args.channels_last:
            import torch

            model.to(memory_format=torch.channels_last)
        workers = default_workers(env) if args.workers is None else args.workers
        loader = D.build_val_loader(dataset, env.eval_batch(args.batch_size), env.rank, env.world_size,
                                    workers, pin_memory=env.device.type == "cuda")
        result = evaluate(model, loader, env.device, settings.amp, args.channels_last, skip_bad=args.skip_bad_images)
    finally:
        cleanup()
    if env.is_main:
        logged = meta.get("val_top1") if args.split == "val" else None  # training evaluated val/ only
        if args.json:
            print(json.dumps({"checkpoint": args.checkpoint, "config": tag, **result, "logged_top1": logged,
                              "preprocessing": settings._asdict()}))
        else:
            note = f" (training logged {logged:.2f}%)" if isinstance(logged, float) else ""
            print(f"{tag} [{description}] {args.checkpoint}\n"
                  f"{split_dir}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
                  f"on {result['count']} images, {settings.describe()}{note}")
            for path in result["skipped_images"]:
                print(f"left out unreadable image {path}")
            if result["skipped"]:
                print(f"{result['skipped']} unreadable image(s) left out: the accuracies are over the "
                      f"{result['count']} readable ones")
    return 0


if __name__ == "__main__":
    run_main(main)
