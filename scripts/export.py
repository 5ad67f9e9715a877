"""Export a trained N2UQ checkpoint to integer inference formats and verify every export.

    python scripts/export.py --checkpoint models/resnet18_2bit.pth.tar --out exports/
    python scripts/export.py --checkpoint CKPT --out DIR --format onnx --data data/fashion_mnist --val_top1

The configuration (architecture, bits, downsample kind, classes) is inferred from the checkpoint
and the weights are loaded strictly. The model is converted to the integer model
(:mod:`n2uq.export.integer`) and written as

* ``onnx``: ``<tag>.onnx``, the exact export: quantized convs as ``ConvInteger`` (bit-exact codes;
  onnxruntime has no optimized kernel for it, so it runs slower than the float model);
* ``fast``: ``<tag>.fast.onnx``, the QDQ form onnxruntime runs on its 8-bit ``QLinearConv`` kernels
  (:mod:`n2uq.export.fast_onnx`; ``--fast_residual`` chooses how the convs feeding the residual
  stream run: ``int8``, fast but approximate, requantized over ranges calibrated on
  ``--calibration_images`` val images (64) with ``--data``, else on the check batch; or ``float``,
  exact);
* ``qonnx``: ``<tag>.qonnx.onnx``, ``MultiThreshold`` nodes, static input shape of the check batch;
* ``packed``: ``<tag>.n2uq``, weight codes bit-packed at b bits (+ the size table).

Each is checked on a batch (random images, or images spread over ``--data``/val) against the
PyTorch fake-quant model and the integer model: codes layer by layer, logits, top-1; the
agreement is printed and the exit status is 1 if any check fails (2 for usage errors). An int8
fast file is approximate: its check passes when its exact parts agree and prints ``APPROXIMATE``
with its end-to-end agreement on the check batch, and the run does not call it verified unless
``--val_top1`` measured it within its goal (docs/integer_inference.md).
``--val_top1`` also compares the ONNX models' top-1 with the PyTorch model's over all of val/.
Images are preprocessed as the checkpoint's training run recorded (``--image_size`` and
``--val_resize`` only for a file that records none; a contradicting value is refused), ``--data``'s
class folders must be the checkpoint's, and every file is written beside its name and renamed into
place, so an interrupted export never leaves a half-written file under a final name.
Every format's packages and limits (:mod:`n2uq.export.limits`: int8 weight codes for onnx/fast,
float32-exact accumulators for qonnx) are checked before anything is converted or written, and
``--out`` is created only then: a format asked for with ``--format`` that is missing a package or
cannot take the model is a usage error; with the default formats it is skipped with one line.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()

import torch  # noqa: E402

from n2uq.atomic_io import atomic_path  # noqa: E402
from n2uq.checkpoint import describe, load_model_state, load_state_dict_strict  # noqa: E402
from n2uq.cli import OneLineParser, UsageError, check_output_dir, check_ranges, run_main  # noqa: E402
from n2uq.data import DataError, image_folder, val_transform  # noqa: E402
from n2uq.export.integer import convert  # noqa: E402
from n2uq.export.limits import format_limits  # noqa: E402
from n2uq.export.verify import check_against_fake_quant  # noqa: E402
from n2uq.run_config import check_classes  # noqa: E402
from scripts.evaluate import evaluation_settings  # noqa: E402
from scripts.export_checks import (  # noqa: E402
    report,
    spread_images,
    val_top1,
    verify_onnx,
    verify_packed,
    verify_qonnx,
    write_fast,
)
from scripts.model_zoo import build_model  # noqa: E402

FORMATS = ("onnx", "fast", "qonnx", "packed")
#: Python packages each format needs (import name = pip name).
NEEDS = {"onnx": ("onnx", "onnxruntime"), "fast": ("onnx", "onnxruntime"), "qonnx": ("onnx", "qonnx"),
         "packed": ()}
#: Val images that calibrate the fast format's int8 residual ranges with ``--data`` (``--calibration_images``).
CALIBRATION_IMAGES = 64


def get_args_parser() -> OneLineParser:
    p = OneLineParser(description="Export an N2UQ checkpoint to ONNX / QONNX / bit-packed integer form "
                                  "and verify each export against the PyTorch model.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="N2UQ checkpoint (.pth.tar or state dict)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--format", default=None,
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: all whose packages are installed)")
    p.add_argument("--fast_residual", choices=("int8", "float"), default="int8",
                   help="fast format: convs feeding the residual stream as 8-bit QLinearConv over ranges "
                        "calibrated on images (fast; --calibration_images), or as float32 Conv (exact)")
    p.add_argument("--data", default=None, metavar="DIR", help="ImageFolder root; the check batch comes from val/")
    p.add_argument("--batch_size", type=int, default=8, help="images in the check batch")
    p.add_argument("--calibration_images", type=int, default=None, metavar="N",
                   help=f"with --data: val images that calibrate the fast format's int8 residual ranges (default "
                        f"{CALIBRATION_IMAGES}; without --data the check batch calibrates them)")
    p.add_argument("--image_size", type=int, default=None,
                   help="input size, for a file that records none (default 224; else the training run's)")
    p.add_argument("--val_resize", type=int, default=None,
                   help="resize before the center crop, for a file that records none (default 256; else "
                        "training's)")
    p.add_argument("--val_top1", action="store_true", help="also compare the ONNX files' top-1 with PyTorch's "
                                                            "on all of val/")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check batch")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def parse_formats(value: Optional[str]) -> List[str]:
    """The formats to write: ``--format`` (each one's packages must be installed), or every format
    whose packages are (the others skipped with one line each)."""
    formats = list(FORMATS) if value is None else [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if not formats or bad:
        raise UsageError(f"--format {value!r}: expected a comma-separated subset of {','.join(FORMATS)}")
    chosen = []
    for f in formats:
        missing = [m for m in NEEDS[f] if importlib.util.find_spec(m) is None]
        if missing and value is not None:
            raise UsageError(f"--format {f} needs the Python package(s) {', '.join(missing)}: "
                             f"pip install {' '.join(missing)}")
        if missing:
            print(f"skipping the {f} format: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
        else:
            chosen.append(f)
    return chosen


def apply_limits(formats: List[str], model: torch.nn.Module, explicit: bool) -> List[str]:
    """The formats that can take ``model`` (:func:`n2uq.export.limits.format_limits`): one asked for with
    ``--format`` that cannot is a usage error; a default one is skipped with one line."""
    limits = format_limits(model)
    for f in formats:
        if limits[f] and explicit:
            raise UsageError(f"--format {f} cannot take this model: {limits[f]}")
        if limits[f]:
            print(f"skipping the {f} format: {limits[f]}")
    return [f for f in formats if not limits[f]]


def check_format_flags(args, formats: List[str]) -> None:
    """Flags that need a format: ``--val_top1`` (onnx or fast), ``--calibration_images`` (fast, int8)."""
    if args.val_top1 and (args.data is None or not {"onnx", "fast"} & set(formats)):
        raise UsageError("--val_top1 needs --data and the onnx or fast format")
    if args.calibration_images is not None and (args.data is None or "fast" not in formats
                                                or args.fast_residual != "int8"):
        raise UsageError("--calibration_images sets how many --data val images calibrate the fast format's int8 "
                         "residual ranges: it needs --data, the fast format and --fast_residual int8")


def make_output_dir(path: str) -> None:
    """Create ``--out`` (the first thing written, after every check)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot create the folder ({exc.strerror}); pass a folder you can "
                         f"write to") from None


def check_batch(args, dataset, image_size: int) -> torch.Tensor:
    if dataset is None:
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randn(args.batch_size, 3, image_size, image_size, generator=gen)
    return spread_images(dataset, args.batch_size)


def calibration_images(args, dataset, x: torch.Tensor):
    """Images that calibrate the fast format's int8 residual ranges, and their description: with
    ``--data``, ``--calibration_images`` (default :data:`CALIBRATION_IMAGES`) spread over val/; else
    the check batch."""
    if dataset is None or args.fast_residual != "int8":
        return x, f"the {len(x)} check images"
    images = spread_images(dataset, args.calibration_images or CALIBRATION_IMAGES)
    return images, f"{len(images)} val images"


def load(args):
    """``(model in eval mode, config, meta, image size, val resize)`` of ``--checkpoint``, refusing the
    compared methods and preprocessing flags that contradict the file."""
    state_dict, config, meta = load_model_state(args.checkpoint)
    if config.method != "n2uq":
        raise UsageError(f"{args.checkpoint} is a {config.method} model: integer export covers N2UQ models (LTQ "
                         f"activations, HardQuantizeConv weights) and their ablations, not the compared methods")
    try:  # the preprocessing the checkpoint was trained with; a contradicting flag is refused
        settings = evaluation_settings(meta, args.image_size, args.val_resize)
    except UsageError as exc:
        raise UsageError(f"{args.checkpoint}: {exc}") from None
    model = build_model(config)
    load_state_dict_strict(model, state_dict, source=args.checkpoint)
    return model.eval(), config, meta, settings.image_size, settings.val_resize


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    formats = parse_formats(args.format)
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"--checkpoint file not found: {args.checkpoint}")
    check_ranges({"--batch_size": args.batch_size, "--image_size": args.image_size, "--val_resize": args.val_resize,
                  "--calibration_images": args.calibration_images})
    check_output_dir(args.out, "--out")
    check_format_flags(args, formats)
    if args.data is not None and not os.path.isdir(os.path.join(args.data, "val")):
        raise DataError(f"--data {args.data} has no val/ folder (expected an ImageFolder tree val/<class>/*)")

    model, config, meta, image_size, val_resize = load(args)
    print(f"checkpoint: {args.checkpoint} -> {describe(config)} ({config.tag})")
    formats = apply_limits(formats, model, explicit=args.format is not None)
    check_format_flags(args, formats)
    dataset = None
    if args.data is not None:
        dataset = image_folder(args.data, "val", val_transform(image_size, val_resize))
        check_classes(dataset.classes, os.path.join(args.data, "val"), config.num_classes, meta)
    make_output_dir(args.out)
    x = check_batch(args, dataset, image_size)
    print(f"check batch: {tuple(x.shape)} {'from ' + args.data + '/val' if dataset is not None else 'random normal'}")

    start = time.time()
    int_model = convert(model, meta={**config.as_dict(), "tag": config.tag})
    s = int_model.summary()
    print(f"integer model: {s['threshold_units']} threshold units, {s['int_convs']} integer convs; "
          f"{s['streamlined_channels']}/{s['channels']} channels streamlined to integer thresholds, "
          f"{s['fallback_channels']} keep the float chain (negative PReLU slope) [{time.time() - start:.1f}s]")
    fq = check_against_fake_quant(model, int_model, x, yardstick=True)
    ok = report("integer model vs PyTorch fake-quant", fq)
    with torch.no_grad():
        fq_logits = model(x)

    base = os.path.join(args.out, config.tag)
    approximate = False
    if "onnx" in formats:
        from n2uq.export.onnx_export import export_onnx

        with atomic_path(base + ".onnx") as tmp:
            export_onnx(int_model, tmp)
        print(f"wrote {base}.onnx")
        ok &= verify_onnx(int_model, base + ".onnx", x, fq_logits)
    if "fast" in formats:
        fast_ok, approximate = write_fast(int_model, base + ".fast.onnx", x, fq_logits, args.fast_residual,
                                          *calibration_images(args, dataset, x))
        ok &= fast_ok
    if "qonnx" in formats:
        from n2uq.export.qonnx_export import export_qonnx

        with atomic_path(base + ".qonnx.onnx") as tmp:
            export_qonnx(int_model, list(x.shape), tmp)
        print(f"wrote {base}.qonnx.onnx (input shape {list(x.shape)})")
        ok &= verify_qonnx(int_model, base + ".qonnx.onnx", x)
    if "packed" in formats:
        from n2uq.export.packing import save_packed, size_table

        with atomic_path(base + ".n2uq") as tmp:
            stats = save_packed(int_model, tmp)
        print(f"wrote {base}.n2uq")
        ok &= verify_packed(int_model, base + ".n2uq", x)
        print(size_table(model.state_dict(), stats, os.path.getsize(args.checkpoint)))
    measured = False
    if args.val_top1:
        paths = {f: base + suffix for f, suffix in (("onnx", ".onnx"), ("fast", ".fast.onnx")) if f in formats}
        ok &= val_top1(model, int_model, paths, dataset, args.batch_size)
        measured = "fast" in paths
    if not ok:
        print("error: export verification failed (see FAILED above)", file=sys.stderr)
        return 1
    if approximate and not measured:
        print(f"exports verified except {base}.fast.onnx: it is approximate (8-bit residual stream; see its "
              f"APPROXIMATE line), not verified; --data DIR --val_top1 measures its agreement on a validation set "
              f"(or --fast_residual float writes an exact fast file)")
    elif approximate:
        print("all exports verified (the fast file is approximate; its top-1 over val/ met the goal)")
    else:
        print("all exports verified")
    return 0


if __name__ == "__main__":
    run_main(main)
