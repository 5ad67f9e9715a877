"""Train an N2UQ ResNet-18/34/50 with the paper's recipe and the shared engine.

    torchrun --nproc_per_node=8 train.py --data /path/to/imagenet --n_bit 2 --quantize_downsample False
    python train.py --data DIR ...            # one process, no torchrun

Flags: ``python train.py --help`` (the reference's names; ``--batch_size`` is global). As in the
reference, ``--quantize_downsample`` defaults to True; checkpoints go to
``<save>/<arch>_<b>bit_quantize_downsample_<True|False>/``, the reference's folder
(``<save>/<arch>_<method>_<b>bit_...`` for ``--method lsq|pact|dorefa`` and N2UQ's ablations).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()

from n2uq.cli import (  # noqa: E402
    UsageError,
    build_train_parser,
    check_run,
    parse_train_config,
    run_main,
    validate_train_config,
)
from n2uq.recipe import RESNET_ALPHA_PATTERNS  # noqa: E402
from n2uq.train_state import run_name  # noqa: E402
from resnet.resnet import ARCHS  # noqa: E402


def _resolve_defaults(args) -> None:
    """The reference's defaults that depend on other flags."""
    if not hasattr(args, "quantize_downsample"):  # not given: True, as the reference (no such layer in torchvision's)
        args.quantize_downsample = not args.full_precision
    if args.pretrained == "auto":
        args.pretrained = "authors" if args.quantize_downsample and not args.full_precision else "torchvision"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_train_parser(list(ARCHS), default_arch="resnet18", default_bits=2, prog="resnet/train.py",
                                run_folder="SAVE/<arch>_<b>bit_quantize_downsample_<True|False>/ (with another "
                                           "--method or an ablation: SAVE/<arch>_<method>_<b>bit_...)")
    parser.add_argument("--full_precision", action="store_true",
                        help="train torchvision's full-precision ResNet instead (a baseline; not N2UQ)")
    cfg = parse_train_config(parser, argv, _resolve_defaults)
    model = cfg.student
    quantizers = validate_train_config(cfg)
    if model.full_precision and model.quantize_downsample:
        raise UsageError("--full_precision trains torchvision's full-precision ResNet, which has no quantized "
                         "downsample; drop --quantize_downsample or --full_precision")
    if model.full_precision and not quantizers.is_default:
        raise UsageError("--full_precision trains a model without quantizers; drop --method and the ablation flags")
    if model.full_precision:
        name = f"{model.student}_fp"
        config = {"arch": model.student, "full_precision": True}
        described = f"full-precision {model.student} (torchvision's)"
    else:
        name = run_name(model.student, model.n_bit, model.quantize_downsample, quantizers.tag)
        config = {"arch": model.student, "n_bit": model.n_bit, "quantize_downsample": model.quantize_downsample,
                  "method": quantizers.tag, "quantizers": quantizers.as_dict()}
        described = (f"{model.student} W{model.n_bit}A{model.n_bit} {quantizers.tag}, quantize_downsample "
                     f"{model.quantize_downsample}, --pretrained {model.pretrained}")
    if cfg.run.check_only:
        print("\n".join(check_run(cfg, described, os.path.join(cfg.run.save, name))))
        return 0
    from n2uq import engine  # after the checks: --help and --check_only need none of the training modules

    if model.full_precision:
        import torchvision

        build = lambda num_classes: torchvision.models.get_model(model.student, num_classes=num_classes)
    else:
        build = lambda num_classes: ARCHS[model.student](model.n_bit, model.quantize_downsample, num_classes,
                                                         quantizers)
    engine.fit(build, cfg, alpha_patterns=RESNET_ALPHA_PATTERNS, run_name=name, config=config)
    return 0


if __name__ == "__main__":
    run_main(main)
