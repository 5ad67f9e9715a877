#!/usr/bin/env bash
# Train the N2UQ MobileNetV2 (W4A4 in the paper) with the paper's recipe (docs/SPEC.md, training recipe).
#
#   bash run.sh [more train.py flags]
#   DATA=/data/imagenet NPROC=8 bash run.sh --amp bf16
#
# DATA: ImageFolder root with train/ and val/ (default ./data/imagenet).
# NPROC: processes (default: all visible GPUs; one CPU process when there is none).
# TORCHRUN_ARGS: extra torchrun flags for several machines (see resnet/run.sh).
# The log goes to log/<run folder>.txt (appended; e.g. mobilenetv2_4bit), checkpoints to ./models/mobilenetv2_<b>bit/ (--save;
# a run the reference's script started directly in ./models is resumed and continued there).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

die() { echo "run.sh: error: $*" >&2; exit 2; }
DATA="${DATA:-./data/imagenet}"
[ -d "$DATA" ] || die "data directory not found: $DATA (set DATA=/path/with/train+val, or run scripts/prepare_demo_data.py)"

source "$HERE/../scripts/launch_lib.sh"
launch_training "$HERE/train.py" --data "$DATA" "$@"
