"""Train an N2UQ ResNet-18/34/50 with the paper's recipe and the shared engine.

    torchrun --nproc_per_node=8 train.py --data /path/to/imagenet --n_bit 2 --quantize_downsample False
    python train.py --data DIR ...            # one process, no torchrun

Flags: ``python train.py --help`` (the reference's names; ``--batch_size`` is global). As in the
reference, ``--quantize_downsample`` defaults to True; checkpoints go to
``<save>/<arch>_<b>bit_quantize_downsample_<True|False>/``, the reference's folder
(``<save>/<arch>_<method>_<b>bit_...`` for ``--method lsq|pact|dorefa`` and N2UQ's ablations).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from n2uq import engine  # noqa: E402
from n2uq.cli import UsageError, build_train_parser, run_main, validate_train_args  # noqa: E402
from n2uq.recipe import RESNET_ALPHA_PATTERNS  # noqa: E402
from n2uq.train_state import run_name  # noqa: E402
from resnet.resnet import ARCHS  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_train_parser(list(ARCHS), default_arch="resnet18", default_bits=2, prog="resnet/train.py",
                                run_folder="SAVE/<arch>_<b>bit_quantize_downsample_<True|False>/ (with another "
                                           "--method or an ablation: SAVE/<arch>_<method>_<b>bit_...)")
    parser.add_argument("--full_precision", action="store_true",
                        help="train torchvision's full-precision ResNet instead (a baseline; not N2UQ)")
    args = parser.parse_args(argv)
    if not hasattr(args, "quantize_downsample"):  # not given: the reference's default (no such layer in torchvision's)
        args.quantize_downsample = not args.full_precision
    quantizers = validate_train_args(args)
    if args.full_precision and args.quantize_downsample:
        raise UsageError("--full_precision trains torchvision's full-precision ResNet, which has no quantized "
                         "downsample; drop --quantize_downsample or --full_precision")
    if args.full_precision and not quantizers.is_default:
        raise UsageError("--full_precision trains a model without quantizers; drop --method and the ablation flags")
    if args.check_only:
        return 0
    if args.full_precision:
        import torchvision

        build = lambda num_classes: torchvision.models.get_model(args.student, num_classes=num_classes)
        name = f"{args.student}_fp"
        config = {"arch": args.student, "full_precision": True}
    else:
        build = lambda num_classes: ARCHS[args.student](args.n_bit, args.quantize_downsample, num_classes, quantizers)
        name = run_name(args.student, args.n_bit, args.quantize_downsample, quantizers.tag)
        config = {"arch": args.student, "n_bit": args.n_bit, "quantize_downsample": args.quantize_downsample,
                  "method": quantizers.tag, "quantizers": quantizers.as_dict()}
    if args.pretrained == "auto":
        args.pretrained = "authors" if args.quantize_downsample and not args.full_precision else "torchvision"
    engine.fit(build, args, alpha_patterns=RESNET_ALPHA_PATTERNS, run_name=name, config=config)
    return 0


if __name__ == "__main__":
    run_main(main)
