"""Train the N2UQ MobileNetV2 (W4A4 in the paper) with the paper's recipe and the shared engine.

    torchrun --nproc_per_node=8 train.py --data /path/to/imagenet
    python train.py --data DIR ...            # one process, no torchrun

The alpha (lr/10) group also takes ``quan3.a``, as the reference MobileNetV2 script. Checkpoints
go to ``<save>/mobilenetv2_<b>bit/``; the reference's script writes them directly into ``<save>``,
and ``--resume auto`` finds a run there too (and goes on writing there).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilenetv2.mobilenet_v2 import MobileNetV2  # noqa: E402
from n2uq import engine  # noqa: E402
from n2uq.cli import build_train_parser, run_main, validate_train_args  # noqa: E402
from n2uq.recipe import MOBILENETV2_ALPHA_PATTERNS  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_train_parser(["mobilenetv2"], default_arch="mobilenetv2", default_bits=4,
                                with_downsample=False, prog="mobilenetv2/train.py",
                                run_folder="SAVE/mobilenetv2_<b>bit/ (or SAVE itself, for a run the reference's "
                                           "script started there; SAVE/mobilenetv2_<method>_<b>bit/ with another "
                                           "--method or an ablation)")
    args = parser.parse_args(argv)
    quantizers = validate_train_args(args)
    if args.check_only:
        return 0
    if args.pretrained == "auto":
        args.pretrained = "authors"
    method = "" if quantizers.is_default else f"{quantizers.tag}_"
    config = {"arch": "mobilenetv2", "n_bit": args.n_bit, "quantize_downsample": False, "method": quantizers.tag,
              "quantizers": quantizers.as_dict()}
    engine.fit(lambda num_classes: MobileNetV2(args.n_bit, num_classes, quantizers), args,
               alpha_patterns=MOBILENETV2_ALPHA_PATTERNS, run_name=f"mobilenetv2_{method}{args.n_bit}bit",
               config=config, reference_run_dir="." if quantizers.is_default else None)
    return 0


if __name__ == "__main__":
    run_main(main)
