"""Train the N2UQ MobileNetV2 (W4A4 in the paper) with the paper's recipe and the shared engine.

    torchrun --nproc_per_node=8 train.py --data /path/to/imagenet
    python train.py --data DIR ...            # one process, no torchrun

The alpha (lr/10) group also takes ``quan3.a``, as the reference MobileNetV2 script. Checkpoints
go to ``<save>/mobilenetv2_<b>bit/``. The reference's script trains W4A4 N2UQ only (it hard-codes
4 bits) and writes directly into ``<save>``: for that configuration ``--resume auto`` finds a run
there too (and goes on writing there); every other one keeps to its own folder.
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

from mobilenetv2.mobilenet_v2 import MobileNetV2  # noqa: E402
from n2uq.cli import build_train_parser, check_run, parse_train_config, run_main, validate_train_config  # noqa: E402
from n2uq.recipe import MOBILENETV2_ALPHA_PATTERNS  # noqa: E402

#: The bit width the reference's MobileNetV2 script hard-codes: only its runs can be in ``<save>`` itself.
REFERENCE_BITS = 4


def _resolve_defaults(args) -> None:
    if args.pretrained == "auto":  # the authors' real_mbv2.pth.tar, as the paper
        args.pretrained = "authors"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_train_parser(["mobilenetv2"], default_arch="mobilenetv2", default_bits=4,
                                with_downsample=False, prog="mobilenetv2/train.py",
                                run_folder="SAVE/mobilenetv2_<b>bit/ (or SAVE itself, for a W4A4 N2UQ run the "
                                           "reference's script started there; SAVE/mobilenetv2_<method>_<b>bit/ "
                                           "with another --method or an ablation)")
    cfg = parse_train_config(parser, argv, _resolve_defaults)
    n_bit = cfg.student.n_bit
    quantizers = validate_train_config(cfg)
    method = "" if quantizers.is_default else f"{quantizers.tag}_"
    name = f"mobilenetv2_{method}{n_bit}bit"
    if cfg.run.check_only:
        described = f"mobilenetv2 W{n_bit}A{n_bit} {quantizers.tag}, --pretrained {cfg.student.pretrained}"
        print("\n".join(check_run(cfg, described, os.path.join(cfg.run.save, name))))
        return 0
    from n2uq import engine  # after the checks: --help and --check_only need none of the training modules

    config = {"arch": "mobilenetv2", "n_bit": n_bit, "quantize_downsample": False, "method": quantizers.tag,
              "quantizers": quantizers.as_dict()}
    engine.fit(lambda num_classes: MobileNetV2(n_bit, num_classes, quantizers), cfg,
               alpha_patterns=MOBILENETV2_ALPHA_PATTERNS, run_name=name,
               config=config, reference_run_dir="." if quantizers.is_default and n_bit == REFERENCE_BITS else None)
    return 0


if __name__ == "__main__":
    run_main(main)
