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
# The log goes to log/<run folder>.txt (appended; the folder train.py names, e.g.
# resnet18_2bit_quantize_downsample_False or resnet18_fp), checkpoints to ./models/<run folder>/ (--save).
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

# The positional arguments set these; a flag after them that says otherwise would silently win.
same_as_argument() {  # same_as_argument FLAG VALUE: whether VALUE agrees with ARCH, BITS or QD
    case "$1" in
        --student) [ "$2" = "$ARCH" ];;
        --n_bit) [ "$2" = "$BITS" ];;
        *) case "${2,,}" in 1|true) [ "$QD" = True ];; 0|false) [ "$QD" = False ];; *) false;; esac;;
    esac
}
prev=""
for arg in "$@"; do
    flag="" value=""
    case "$prev" in --student|--n_bit|--quantize_downsample) flag="$prev" value="$arg";; esac
    case "$arg" in --student=*|--n_bit=*|--quantize_downsample=*) flag="${arg%%=*}" value="${arg#*=}";; esac
    if [ -n "$flag" ] && ! same_as_argument "$flag" "$value"; then
        die "$flag $value contradicts the ARCH BITS QD arguments ($ARCH $BITS $QD); set it there"
    fi
    prev="$arg"
done

source "$HERE/../scripts/launch_lib.sh"
launch_training "$HERE/train.py" --data "$DATA" --student "$ARCH" --n_bit "$BITS" --quantize_downsample "$QD" "$@"
