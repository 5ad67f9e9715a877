#!/usr/bin/env bash
# Train an N2UQ ResNet with the paper's recipe (docs/SPEC.md, training recipe).
#
#   bash run.sh ARCH BITS QD [more train.py flags]
#   bash run.sh resnet18 2 0                       # W2A2 ResNet-18, full-precision downsample
#   DATA=/data/imagenet NPROC=4 bash run.sh resnet50 4 1 --amp bf16
#   bash run.sh resnet18 2 0 --method lsq             # a compared method (lsq, pact, dorefa), same recipe
#
# ARCH: resnet18 | resnet34 | resnet50; BITS: 1..8; QD (quantize downsample): 0 | 1 | True | False,
# always passed to train.py (whose own default is True, as in the reference).
# DATA: ImageFolder root with train/ and val/ (default ./data/imagenet).
# NPROC: processes (default: all visible GPUs; one CPU process when there is none).
# TORCHRUN_ARGS: extra torchrun flags for several machines, e.g.
#   "--nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint host0:29500"
# The log goes to log/<run name>.txt (appended), checkpoints to ./models/<run name>/ (--save).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

die() { echo "run.sh: error: $*" >&2; exit 2; }
[ $# -ge 3 ] || die "usage: bash run.sh ARCH BITS QD [train.py flags], e.g. bash run.sh resnet18 2 0"
ARCH="$1"; BITS="$2"; QD="$3"; shift 3
case "$ARCH" in resnet18|resnet34|resnet50) ;; *) die "unknown ARCH '$ARCH' (use resnet18, resnet34 or resnet50)";; esac
[[ "$BITS" =~ ^[1-8]$ ]] || die "BITS must be an integer in 1..8, got '$BITS'"
case "${QD,,}" in 1|true) QD=True;; 0|false) QD=False;; *) die "QD must be 0, 1, True or False, got '$QD'";; esac
DATA="${DATA:-./data/imagenet}"
[ -d "$DATA" ] || die "data directory not found: $DATA (set DATA=/path/with/train+val, or run scripts/prepare_demo_data.py)"

source "$HERE/../scripts/launch_lib.sh"
TAG="$(method_tag "$@")"
launch_training "$HERE/train.py" "log/${ARCH}_${TAG}${BITS}bit_quantize_downsample_${QD}.txt" \
    --data "$DATA" --student "$ARCH" --n_bit "$BITS" --quantize_downsample "$QD" "$@"
