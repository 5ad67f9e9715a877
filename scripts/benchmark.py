"""Speed and memory of the N2UQ quantizer and of a quantized training step, against baselines
measured in the same run (results and the project's goals: docs/benchmarks.md), and the
inference speed of the exported integer models in onnxruntime (docs/integer_inference.md).

Modes:
  quantizer  LTQ forward+backward vs nn.ReLU forward+backward on one tensor (default
             32×128×28×28) at 2, 3, 4 bits, the reference loop form from tests/reference.py as a
             third column, and the bytes autograd saves for backward per input byte.
  step       one training step (forward, loss, backward, Adam) of N2UQ ResNet-18 W2A2 / W4A4 vs
             torchvision's full-precision ResNet-18, teacher off and on (ResNet-101, KD loss):
             time ratio and saved activations (CPU) / peak memory (CUDA).
  gpu        on CUDA: training images/s of FP ResNet-18 and W2A2/W4A4 with a ResNet-101 teacher,
             fp32 vs bf16 autocast + channels_last, N2UQ kernels on and off, and eval throughput.
  inference  onnxruntime on the CPU: float32 ONNX of a ResNet, onnxruntime's quantize_static int8
             model of it, the exact N2UQ export (ConvInteger) and the fast one (QDQ → QLinearConv),
             batch 1 and 32 at 224×224 (scripts/bench_inference.py; not part of "all").
  all        quantizer, then step (and gpu when CUDA is present).

Every timing is the median over rounds in which all compared variants run one after another
(interleaved), so load on the machine affects them alike; the ratio of the fastest rounds is
printed beside it (on a shared machine it is the steadier of the two). Python's garbage collector
runs between timed calls, not inside them. Models use random init (no download).

  python scripts/benchmark.py --mode quantizer
  python scripts/benchmark.py --mode step --batch-size 16 --rounds 5
  python scripts/benchmark.py --mode gpu --batch-size 256
  python scripts/benchmark.py --mode inference --threads 2 --rounds 7 --plot docs/inference_speed.png

The measuring is in ``scripts/bench_measure.py``, the modes in ``scripts/bench_modes.py`` and
``scripts/bench_inference.py``; this file is the command line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()

import torch  # noqa: E402
import torchvision  # noqa: E402

from n2uq.bitwidth import MAX_BITS, MIN_BITS  # noqa: E402
from n2uq.cli import OneLineParser, UsageError, check_ranges, run_main  # noqa: E402
from scripts.bench_inference import INFERENCE_DEFAULTS, check_inference_args, inference_mode  # noqa: E402
from scripts.bench_modes import gpu_mode, quantizer_mode, step_mode  # noqa: E402


def get_args_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["quantizer", "step", "gpu", "inference", "all"], default="all")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu for quantizer/step, "
                                                       "cuda for gpu)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="quantizer bit widths")
    parser.add_argument("--step-bits", type=int, nargs="+", default=[2, 4], help="W/A bits of the students")
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 128, 28, 28], help="quantizer tensor")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (CPU step), 256 (gpu)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--teacher", choices=["off", "on", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 30 quantizer, 5 step)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-reference", action="store_true", help="no reference loop column (faster)")
    parser.add_argument("--breakdown", action="store_true",
                        help="quantizer mode: also time the kernels alone and the per-call cost, against ReLU's")
    parser.add_argument("--with-reference", action="store_true",
                        help="step mode: also time the students with N2UQ_KERNELS=reference (module by module)")
    inference = parser.add_argument_group("inference mode")
    inference.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50"], default=None,
                           help=f"generated model (default {INFERENCE_DEFAULTS['arch']}); a checkpoint records its own")
    inference.add_argument("--inference-bits", type=int, default=None,
                           help=f"W/A bits of the generated model (default {INFERENCE_DEFAULTS['inference_bits']})")
    inference.add_argument("--quantize-downsample", type=int, choices=[0, 1], default=None,
                           help=f"generated model's downsample (default {INFERENCE_DEFAULTS['quantize_downsample']})")
    inference.add_argument("--inference-batch-sizes", type=int, nargs="+", default=[1, 32])
    inference.add_argument("--checkpoint", default=None, help="a trained N2UQ checkpoint instead of generated weights")
    inference.add_argument("--plot", default=None, metavar="PNG", help="bar chart of the time ratios")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse values no mode can run with (one line, exit 2) before anything is measured."""
    check_ranges({"--image-size": args.image_size, "--rounds": args.rounds, "--batch-size": args.batch_size,
                  "--threads": args.threads},
                 {"--warmup": args.warmup})
    for flag, values in (("--bits", args.bits), ("--step-bits", args.step_bits),
                         ("--inference-bits", [args.inference_bits] if args.inference_bits is not None else [])):
        bad = [b for b in values if not MIN_BITS <= b <= MAX_BITS]
        if bad:
            raise UsageError(f"{flag} must be in {MIN_BITS}..{MAX_BITS}, got {bad[0]}")
    for flag, values in (("--shape", args.shape), ("--inference-batch-sizes", args.inference_batch_sizes)):
        if any(v <= 0 for v in values):
            raise UsageError(f"{flag} values must be positive, got {' '.join(map(str, values))}")


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    if args.mode == "inference":
        check_inference_args(args)
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ["quantizer", "step", "gpu"] if args.mode == "all" else [args.mode]
    for mode in modes:
        default_device = "cuda" if mode == "gpu" else "cpu"
        device = torch.device(args.device or default_device)
        if device.type == "cuda" and not torch.cuda.is_available():
            if mode == "gpu" and args.mode == "all":
                print("\n== gpu: skipped (no CUDA device)")
                continue
            raise UsageError(f"--device {device} requested but CUDA is not available; use --device cpu")
        mode_args = argparse.Namespace(**vars(args))
        if mode_args.rounds is None:
            mode_args.rounds = {"quantizer": 30, "inference": 7}.get(mode, 5)
        if mode_args.batch_size is None:
            mode_args.batch_size = 256 if mode == "gpu" else 16
        mode_args.bits = args.inference_bits if mode == "inference" else args.bits
        modes_by_name = {"quantizer": quantizer_mode, "step": step_mode, "gpu": gpu_mode, "inference": inference_mode}
        modes_by_name[mode](mode_args, device)
    return 0


if __name__ == "__main__":
    run_main(main)
