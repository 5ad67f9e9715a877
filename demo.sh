#!/usr/bin/env bash
# The demo: from a fresh clone to a trained, evaluated and exported N2UQ model in one command.
# `bash demo.sh --help` lists the options; README.md says what to expect.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
T0=$SECONDS
trap 'echo "demo.sh: stopped by an unexpected error at line $LINENO of demo.sh (exit status $?);" \
    "the step logs are in log/demo/" >&2' ERR

usage() {
    cat <<'EOF'
usage: bash demo.sh [options] [-- more train.py flags]

Sets up what is missing, builds the Fashion-MNIST demo set, trains an N2UQ model on it with
resnet/run.sh (W2A2 ResNet-18, 8 epochs: the README's numbers), evaluates the best checkpoint
with scripts/evaluate.py, exports it with scripts/export.py and prints a summary. Run again, it
reuses the data and a finished run and resumes an interrupted one; --fresh starts over.

  --bits N               weight and activation bits, 1..8 (default 2)
  --arch NAME            resnet18 | resnet34 | resnet50 | mobilenetv2 (default resnet18)
  --quantize-downsample  also quantize the 1x1 shortcut convs (ResNet; "N2UQ" instead of "N2UQ *")
  --epochs N             training epochs (default 8)
  --train-per-class N    training images per class, 1..6000 (default 1000)
  --val-per-class N      validation images per class, 1..1000 (default 200)
  --quick                short check: --epochs 2 --train-per-class 50 --val-per-class 20
  --fresh                rebuild the data and retrain, evaluate and export from scratch (every
                         input is checked first; the old run goes when training starts)
  --env MODE             the Python environment that runs it all (also N2UQ_DEMO_ENV):
                           active: the active python3 ($PYTHON if set); missing packages are
                                   installed into it with pip
                           venv:   ./.venv (created with python3 -m venv; packages installed there)
                           auto:   (default) ./.venv if it exists; else the active python3 if it has
                                   the requirements, a virtual environment is active, or it may be
                                   installed into; else (an "externally managed" system Python) venv
  --source DIR           folder with the Fashion-MNIST idx files (also N2UQ_DEMO_SOURCE; default
                         /usr/share/datasets/fashion-mnist, filled by apt-get install
                         dataset-fashion-mnist, which the demo runs when the files are missing)
  -h, --help             this text

Outputs: data/fashion_mnist*/, models/demo/<data>_<E>ep/<run>/ (checkpoints, metrics.jsonl, tb/),
exports/demo/<data>_<E>ep/<run>/, step logs in log/demo/<data>_<E>ep/<run>/ (setup and data logs
in log/demo/). Exit status: 0 done, 1 a step failed, 2 bad usage, 3 no demo data could be found.
Environment: N2UQ_DEMO_WORKDIR (where data/, models/, log/, exports/ and .venv/ go; default
this folder), N2UQ_DEMO_APT_GET (apt-get command; none: never use apt), N2UQ_DEMO_DOWNLOAD=0 (no
torchvision download), N2UQ_KERNELS (torch: the plain-PyTorch kernels), PIP_* for pip.
EOF
}

# shellcheck disable=SC1091  # sibling files of this repository, checked on their own
source "$REPO/scripts/demo_lib.sh"  # usage_error, say, elapsed, fail, log_reason
# shellcheck disable=SC1091
source "$REPO/scripts/launch_lib.sh"  # method_tag, method_name: the run folder and name of flags after --

# ---------------------------------------------------------------- options
BITS=2 ARCH=resnet18 QD=0 EPOCHS="" TRAIN_PC="" VAL_PC="" QUICK=0 FRESH=0
ENV_MODE="${N2UQ_DEMO_ENV:-auto}"
PKG_DIR="${N2UQ_DEMO_SOURCE:-/usr/share/datasets/fashion-mnist}"  # where the Debian package puts them
SOURCE="$PKG_DIR"
EXTRA=()
while [ $# -gt 0 ]; do
    if [[ "$1" == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
    case "$1" in
        -h|--help) usage; exit 0;;
        --quick) QUICK=1; shift;;
        --fresh) FRESH=1; shift;;
        --quantize-downsample) QD=1; shift;;
        --bits|--arch|--epochs|--train-per-class|--val-per-class|--env|--source)
            { [ $# -ge 2 ] && [ -n "$2" ]; } || usage_error "$1 needs a value"
            case "$1" in
                --bits) BITS="$2";; --arch) ARCH="$2";; --epochs) EPOCHS="$2";; --env) ENV_MODE="$2";;
                --train-per-class) TRAIN_PC="$2";; --val-per-class) VAL_PC="$2";; --source) SOURCE="$2";;
            esac
            shift 2;;
        --) shift; EXTRA=("$@"); break;;
        *) usage_error "unknown option '$1'";;
    esac
done
for arg in ${EXTRA[@]+"${EXTRA[@]}"}; do  # what this script sets itself would be overridden, or contradicted
    case "${arg%%=*}" in --student|--n_bit|--quantize_downsample|--save|--data) usage_error "${arg%%=*} after -- is set by this script (use --arch, --bits, --quantize-downsample; the data and runs have their own folders)";;
    esac
done
if [ "$QUICK" = 1 ]; then EPOCHS="${EPOCHS:-2}" TRAIN_PC="${TRAIN_PC:-50}" VAL_PC="${VAL_PC:-20}"; fi
EPOCHS="${EPOCHS:-8}" TRAIN_PC="${TRAIN_PC:-1000}" VAL_PC="${VAL_PC:-200}"
[[ "$BITS" =~ ^[1-8]$ ]] || usage_error "--bits must be an integer in 1..8, got '$BITS'"
case "$ARCH" in resnet18|resnet34|resnet50|mobilenetv2) ;;
    *) usage_error "--arch must be resnet18, resnet34, resnet50 or mobilenetv2, got '$ARCH'";; esac
[ "$ARCH$QD" != mobilenetv21 ] || usage_error "--quantize-downsample is for the ResNets"
{ [[ "$EPOCHS" =~ ^[1-9][0-9]{0,3}$ ]] && [ "$EPOCHS" -ge 2 ]; } ||
    usage_error "--epochs must be an integer of at least 2 (the paper's schedule trains the last epoch at lr 0), got '$EPOCHS'"
{ [[ "$TRAIN_PC" =~ ^[1-9][0-9]*$ ]] && [ "$TRAIN_PC" -le 6000 ]; } ||
    usage_error "--train-per-class must be an integer in 1..6000, got '$TRAIN_PC'"
{ [[ "$VAL_PC" =~ ^[1-9][0-9]*$ ]] && [ "$VAL_PC" -le 1000 ]; } ||
    usage_error "--val-per-class must be an integer in 1..1000, got '$VAL_PC'"
case "$ENV_MODE" in auto|active|venv) ;; *) usage_error "--env must be auto, active or venv, got '$ENV_MODE'";; esac
[ -z "${NPROC:-}" ] || [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || usage_error "NPROC must be a positive integer, got '$NPROC'"

WORK="${N2UQ_DEMO_WORKDIR:-$REPO}"
[ -d "$WORK" ] || usage_error "N2UQ_DEMO_WORKDIR $WORK is not a folder"
cd "$WORK"
if [ "$TRAIN_PC/$VAL_PC" = 1000/200 ]; then DATA=data/fashion_mnist; else DATA="data/fashion_mnist_${TRAIN_PC}x${VAL_PC}"; fi
SETTING="$(basename "$DATA")_${EPOCHS}ep"
count_png() { { find "$1" -mindepth 2 -maxdepth 2 -name '*.png' 2>/dev/null || true; } | wc -l | tr -d ' '; }
has_idx() {
    { [ -e "$1/train-images-idx3-ubyte.gz" ] || [ -e "$1/train-images-idx3-ubyte" ]; } &&
        { [ -e "$1/t10k-images-idx3-ubyte.gz" ] || [ -e "$1/t10k-images-idx3-ubyte" ]; }
}
NO_DATA="install the Debian/Ubuntu package dataset-fashion-mnist, or put the four Fashion-MNIST idx files"
NO_DATA+=" in a folder and pass --source DIR"
N_TRAIN=$((10 * TRAIN_PC)) N_VAL=$((10 * VAL_PC))
n_tr="$(count_png "$DATA/train")" n_va="$(count_png "$DATA/val")"
REUSE_DATA=0
if [ "$FRESH" = 0 ] && [ "$n_tr" = "$N_TRAIN" ] && [ "$n_va" = "$N_VAL" ]; then REUSE_DATA=1; fi
# Every input is checked before anything is deleted or built: a named --source must hold the files.
if [ "$REUSE_DATA" = 0 ] && [ "$SOURCE" != "$PKG_DIR" ] && ! has_idx "$SOURCE"; then
    fail "data" "no Fashion-MNIST idx files in $SOURCE (--source); $NO_DATA" "" 3
fi
TAG="$(method_tag ${EXTRA[@]+"${EXTRA[@]}"})"
if [ "$ARCH" = mobilenetv2 ]; then RUN="mobilenetv2_${TAG}${BITS}bit"
else RUN="${ARCH}_${TAG}${BITS}bit_quantize_downsample_$([ "$QD" = 1 ] && echo True || echo False)"; fi
SAVE="models/demo/$SETTING" RUNDIR="models/demo/$SETTING/$RUN"
LOGDIR="log/demo/$SETTING/$RUN" EXPORTS="exports/demo/$SETTING/$RUN"
EPOCHS_TEXT="$EPOCHS epochs" METHOD="$(method_name "$TAG")"

trap 'echo; echo "demo.sh: interrupted; run bash demo.sh again to go on from where it stopped" >&2; exit 130' INT TERM
mkdir -p log/demo 2>/dev/null ||
    fail "start" "cannot create $WORK/log/demo (permission denied?); run from a folder you can write to"
mkdir -p "$LOGDIR"

free_mb() { df -Pk . | awk 'NR == 2 { print int($4 / 1024) }'; }
need_space() {  # need_space STEP MB
    local have; have="$(free_mb)"
    [ -z "$have" ] || [ "$have" -ge "$2" ] ||
        fail "$1" "only $have MB free in $WORK, this step needs about $2 MB; free some space (df -h .), then run again"
}

# ---------------------------------------------------------------- 1. setup
say "N2UQ demo: W${BITS}A${BITS} $ARCH, $METHOD, on Fashion-MNIST ($N_TRAIN train / $N_VAL val images, $EPOCHS_TEXT)"
SETUP_LOG=log/demo/setup.log
: >"$SETUP_LOG"
BASE_PY="${PYTHON:-python3}"
command -v "$BASE_PY" >/dev/null ||
    fail "setup" "no $BASE_PY found; install Python >= 3.9 (apt-get install -y python3 python3-venv)"
"$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
    fail "setup" "Python >= 3.9 is needed, $BASE_PY is $("$BASE_PY" -V 2>&1); set PYTHON=/path/to/python3.9+"
# has PYTHON MODULE...: all importable (found without importing them, which takes seconds)
has() { "$1" -c 'import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))' \
    "${@:2}" >/dev/null 2>&1; }
has_reqs() { has "$1" torch torchvision numpy PIL tqdm tensorboard; }
APT="${N2UQ_DEMO_APT_GET:-apt-get}"
apt_usable() {
    [ "$APT" != none ] && command -v "$APT" >/dev/null || return 1
    [ "$(id -u)" = 0 ] || command -v sudo >/dev/null
}
apt_install() {  # apt_install LOG PACKAGE...: apt-get update + install, as root or through sudo
    local log="$1" sudo=(); shift
    if [ "$(id -u)" != 0 ]; then sudo=(sudo); [ -t 0 ] || sudo+=(-n); fi
    { "${sudo[@]}" "$APT" update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" "$APT" install -y -q "$@"; } >>"$log" 2>&1
}
externally_managed() {
    "$1" -c 'import os, sys, sysconfig; p = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(p) else 1)' 2>/dev/null
}
VENV="$WORK/.venv"
if [ "$ENV_MODE" = auto ]; then
    if [ -x "$VENV/bin/python" ]; then ENV_MODE=venv WHY="./.venv exists"
    elif has_reqs "$BASE_PY"; then ENV_MODE=active WHY="it has the requirements"
    elif [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then ENV_MODE=active WHY="a virtual environment is active"
    elif externally_managed "$BASE_PY"; then ENV_MODE=venv WHY="the system Python is externally managed"
    else ENV_MODE=active WHY="pip may install into it"; fi
    WHY="--env auto: $WHY"
else
    WHY="--env $ENV_MODE"
fi
if [ "$ENV_MODE" = venv ]; then
    PY="$VENV/bin/python"
    say "python: $PY ($("$BASE_PY" -V 2>&1), a local ./.venv; $WHY; --env active for $BASE_PY)"
    if [ ! -x "$VENV/bin/python" ]; then
        say "setup: creating ./.venv with $BASE_PY -m venv"
        VENV_WAS_THERE=0; [ ! -e "$VENV" ] || VENV_WAS_THERE=1
        if ! "$BASE_PY" -m venv "$VENV" >>"$SETUP_LOG" 2>&1; then
            [ "$VENV_WAS_THERE" = 1 ] || rm -rf -- "$VENV"  # only the half-made one of this attempt
            if ! { apt_usable && say "setup: installing python3-venv with apt-get" &&
                    apt_install "$SETUP_LOG" python3-venv; }; then
                fail "setup" "$BASE_PY -m venv cannot create ./.venv; apt-get install -y python3-venv, or use --env active" \
                    "$SETUP_LOG"
            fi
            "$BASE_PY" -m venv "$VENV" >>"$SETUP_LOG" 2>&1 || fail "setup" \
                "$BASE_PY -m venv cannot create ./.venv ($(log_reason "$SETUP_LOG")); use --env active" "$SETUP_LOG"
        fi
    fi
else
    PY="$("$BASE_PY" -c 'import sys; print(sys.executable)')"
    say "python: $PY ($("$PY" -V 2>&1), the active environment; $WHY; --env venv for a local ./.venv)"
fi
if has_reqs "$PY"; then
    version="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo '?')"
    say "setup: torch $version and the other requirements are installed"
else
    need_space "setup" 3000
    "$PY" -m pip --version >>"$SETUP_LOG" 2>&1 ||
        fail "setup" "pip is missing for $PY; apt-get install -y python3-pip (or use --env venv), then run again" "$SETUP_LOG"
    say "setup: installing the project and its requirements (PyTorch: a few minutes) with pip install -e ."
    if ! "$PY" -m pip install -e "$REPO" >>"$SETUP_LOG" 2>&1; then
        if grep -aq externally-managed-environment "$SETUP_LOG"; then
            fail "setup" "$PY is managed by the system (PEP 668) and pip may not install into it; use --env venv" "$SETUP_LOG"
        fi
        fail "setup" "pip install -e . failed ($(log_reason "$SETUP_LOG")); check the network or proxy (PIP_INDEX_URL), then run again" \
            "$SETUP_LOG"
    fi
    "$PY" -c 'import torch, torchvision' >>"$SETUP_LOG" 2>&1 ||
        fail "setup" "the requirements do not import after pip install ($(log_reason "$SETUP_LOG"))" "$SETUP_LOG"
fi
if ! has "$PY" onnx onnxruntime; then
    say "setup: installing onnx and onnxruntime (for the ONNX export) with pip"
    "$PY" -m pip install onnx onnxruntime >>"$SETUP_LOG" 2>&1 ||
        say "setup: onnx/onnxruntime could not be installed ($(log_reason "$SETUP_LOG")); no ONNX export"
fi
if [ -z "${N2UQ_KERNELS:-}" ] && ! command -v "${CC:-cc}" >/dev/null; then
    export N2UQ_KERNELS=torch
    say "note: no C compiler (${CC:-cc}): the plain-PyTorch kernels are used (same numbers, slower);" \
        "apt-get install -y gcc for the fast ones"
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
T_SETUP=$((SECONDS - T0))

# ---------------------------------------------------------------- 2. data
T=$SECONDS
DATA_LOG="log/demo/data_$(basename "$DATA").log"
if [ "$REUSE_DATA" = 1 ]; then
    say "data: reusing $DATA ($n_tr train / $n_va val images; --fresh rebuilds it)"
else
    if [ "$FRESH" = 0 ] && [ -e "$DATA" ]; then
        say "data: $DATA is incomplete ($n_tr of $N_TRAIN train / $n_va of $N_VAL val images); rebuilding it"
    fi
    need_space "data" 300
    : >"$DATA_LOG"
    if ! has_idx "$SOURCE" && [ "$SOURCE" = "$PKG_DIR" ] && apt_usable; then
        say "data: installing the Debian package dataset-fashion-mnist with $APT"
        apt_install "$DATA_LOG" dataset-fashion-mnist ||
            say "data: $APT could not install dataset-fashion-mnist ($(log_reason "$DATA_LOG"))"
    fi
    args=(--out "$DATA" --train_per_class "$TRAIN_PC" --val_per_class "$VAL_PC" --size 32 --overwrite)
    if has_idx "$SOURCE"; then
        args+=(--source "$SOURCE")
    elif [ "$SOURCE" != "$PKG_DIR" ]; then
        fail "data" "no Fashion-MNIST idx files in $SOURCE (--source); $NO_DATA" "" 3
    else
        if apt_usable; then how="$APT did not provide them"; else how="no apt-get to install them"; fi
        if [ "${N2UQ_DEMO_DOWNLOAD:-1}" = 0 ]; then
            fail "data" "no Fashion-MNIST idx files in $SOURCE ($how; N2UQ_DEMO_DOWNLOAD=0); $NO_DATA" "" 3
        fi
        if [ -d "$SOURCE" ]; then args+=(--source "$SOURCE")  # prepare_demo_data.py downloads when it has none
        elif [ "$SOURCE" != /usr/share/datasets/fashion-mnist ]; then
            fail "data" "no Fashion-MNIST idx files in $SOURCE ($how; no such folder); $NO_DATA" "" 3
        fi
        say "data: no Fashion-MNIST files in $SOURCE ($how); downloading them with torchvision"
    fi
    say "data: building $DATA ($N_TRAIN train / $N_VAL val images, 32x32 PNG; log: $DATA_LOG)"
    if ! "$PY" "$REPO/scripts/prepare_demo_data.py" "${args[@]}" >>"$DATA_LOG" 2>&1; then
        if grep -aq "download failed" "$DATA_LOG"; then
            fail "data" "no Fashion-MNIST idx files in $SOURCE, $how, and the download failed (offline?); $NO_DATA" \
                "$DATA_LOG" 3
        fi
        fail "data" "$(log_reason "$DATA_LOG")" "$DATA_LOG"
    fi
fi
T_DATA=$((SECONDS - T))

# ---------------------------------------------------------------- 3. train
T=$SECONDS
TRAIN_LOG="$LOGDIR/train.log" BEST="$RUNDIR/model_best.pth.tar"
if [ "$ARCH" = mobilenetv2 ]; then
    cmd=(bash "$REPO/mobilenetv2/run.sh" --n_bit "$BITS") check=("$REPO/mobilenetv2/train.py" --n_bit "$BITS")
else
    cmd=(bash "$REPO/resnet/run.sh" "$ARCH" "$BITS" "$QD") check=("$REPO/resnet/train.py" --student "$ARCH" --n_bit
        "$BITS" --quantize_downsample "$([ "$QD" = 1 ] && echo True || echo False)")
fi
# The README's quick-start training: the measured numbers hold for exactly these flags.
flags=(--save "$SAVE" --teacher none --pretrained none --epochs "$EPOCHS" --batch_size 128 --learning_rate 2e-3
       --image_size 32 --val_resize 32 --min_crop_scale 1.0 -j 1 --no_progress ${EXTRA[@]+"${EXTRA[@]}"})
if [ "$FRESH" = 1 ]; then  # the old run goes only once the data is built and the training flags pass
    CHECK_LOG=log/demo/check.log
    "$PY" "${check[@]}" --data "$DATA" "${flags[@]}" --check_only >"$CHECK_LOG" 2>&1 ||
        { status=$?; fail "train" "$(log_reason "$CHECK_LOG"); nothing was deleted" "$CHECK_LOG" "$status"; }
    rm -rf -- "$RUNDIR" "$LOGDIR" "$EXPORTS"
    mkdir -p "$LOGDIR"
fi
# "next_epoch step_in_epoch best_top1 [flags it was trained without]" of the run's checkpoint, or nothing
progress() {
    [ -f "$RUNDIR/checkpoint.pth.tar" ] || return 0
    PYTHONPATH="$REPO" "$PY" -c 'import sys; from scripts.run_flags import differences, recorded_args, read_checkpoint
c = read_checkpoint(sys.argv[1]); print(int(c["next_epoch"]), int(c["step_in_epoch"]), "%.2f" % c["best_top1_acc"],
"; ".join(differences(sys.argv[2:], recorded_args(c))))' \
        "$RUNDIR/checkpoint.pth.tar" "${check[@]}" --data "$DATA" "${flags[@]}" 2>/dev/null || echo "? ? ?"
}
read -r NEXT STEP BEST_TOP1 DIFFS <<<"$(progress) - - -"
DIFFS="${DIFFS%- - -}" DIFFS="${DIFFS% }"
if [ "$NEXT" = "?" ]; then
    fail "train" "$RUNDIR/checkpoint.pth.tar cannot be read (an interrupted copy?); run with --fresh to start over"
fi
# reused or resumed only when it was trained with these flags
[ -z "$DIFFS" ] || fail "train" "$RUNDIR was trained with other settings ($DIFFS); run with --fresh to retrain" "" 2
if [ "$NEXT" != - ] && [ "$NEXT" -ge "$EPOCHS" ] && [ "$STEP" = 0 ] && [ -f "$BEST" ]; then
    say "train: reusing the finished run $RUNDIR ($EPOCHS/$EPOCHS epochs, best val top-1 $BEST_TOP1%; --fresh retrains)"
else
    if [ "$NEXT" != - ]; then
        say "train: resuming $RUNDIR at epoch $((NEXT + 1))/$EPOCHS (log: $TRAIN_LOG)"
    else
        say "train: W${BITS}A${BITS} $ARCH ($METHOD) from scratch, $EPOCHS_TEXT, one line per epoch (log: $TRAIN_LOG)"
    fi
    case "$ARCH" in resnet18) need=600;; resnet34) need=1000;; resnet50) need=1200;; *) need=300;; esac
    need_space "train" "$need"  # two checkpoints (weights + Adam state) and a temporary copy
    cmd+=("${flags[@]}")
    echo "$(date '+%F %T') ${cmd[*]}" >>"$TRAIN_LOG"
    INTERRUPTED=0
    trap 'INTERRUPTED=1' INT TERM  # the training saves a checkpoint and stops; wait for it
    set +e
    PYTHON="$PY" DATA="$DATA" PYTHONUNBUFFERED=1 "${cmd[@]}" 2>&1 |
        (trap '' INT TERM; tee -a "$TRAIN_LOG" | grep --line-buffered -E '^(epoch [0-9]+/[0-9]+ |stopp|resumed from )' |
            sed -u 's/^/  /')
    status=${PIPESTATUS[0]}
    set -e
    if [ "$INTERRUPTED" = 1 ]; then
        echo "demo.sh: interrupted; the run saved a checkpoint: run bash demo.sh again to resume it" >&2
        exit 130
    fi
    trap 'echo; echo "demo.sh: interrupted; run bash demo.sh again to go on from where it stopped" >&2; exit 130' INT TERM
    [ "$status" = 0 ] || fail "train" "$(log_reason "$TRAIN_LOG")" "$TRAIN_LOG"
    read -r NEXT STEP BEST_TOP1 _ <<<"$(progress) - - -"
    if [ "$NEXT" = - ] || [ "$NEXT" = "?" ] || [ "$NEXT" -lt "$EPOCHS" ] || [ ! -f "$BEST" ]; then
        say "train: the run stopped before its last epoch (see $TRAIN_LOG); run bash demo.sh again to go on"
        exit 0
    fi
fi
T_TRAIN=$((SECONDS - T))

# ---------------------------------------------------------------- 4. evaluate
T=$SECONDS
EVAL_JSON="$LOGDIR/evaluate.json" EVAL_LOG="$LOGDIR/evaluate.log"
# reused only when newer than both the checkpoint and the data (a rebuilt val/ is newer)
if [ "$FRESH" = 0 ] && [ -s "$EVAL_JSON" ] && [ "$EVAL_JSON" -nt "$BEST" ] && [ "$EVAL_JSON" -nt "$DATA/val" ]; then
    say "evaluate: up to date ($EVAL_JSON)"
else
    "$PY" "$REPO/scripts/evaluate.py" --checkpoint "$BEST" --data "$DATA" -j 1 --json >"$EVAL_JSON.tmp" 2>"$EVAL_LOG" ||
        { cat "$EVAL_JSON.tmp" >>"$EVAL_LOG"; rm -f "$EVAL_JSON.tmp"; fail "evaluate" "$(log_reason "$EVAL_LOG")" "$EVAL_LOG"; }
    cat "$EVAL_JSON.tmp" >>"$EVAL_LOG"
    mv "$EVAL_JSON.tmp" "$EVAL_JSON"
fi
read -r TOP1 TOP5 COUNT _ <<<"$("$PY" -c 'import json, sys; d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print("%.2f %.2f %d" % (d["top1"], d["top5"], d["count"]))' "$EVAL_JSON" 2>/dev/null || echo "- - -") - - -"
[ "$TOP1" != - ] || fail "evaluate" "no result in $EVAL_JSON; run with --fresh" "$EVAL_LOG"
say "evaluate: top-1 $TOP1%  top-5 $TOP5% on $COUNT val images (scripts/evaluate.py on $BEST)"
T_EVAL=$((SECONDS - T))

# ---------------------------------------------------------------- 5. export
T=$SECONDS
EXPORT_LOG="$LOGDIR/export.log" FORMATS=packed EXPORT_ARGS=()
if has "$PY" onnx onnxruntime; then FORMATS="onnx,$FORMATS" EXPORT_ARGS=(--val_top1); fi
if has "$PY" qonnx; then FORMATS="${FORMATS/packed/qonnx,packed}"; fi
if [[ "$TAG" =~ ^(lsq|pact|dorefa) ]]; then
    say "export: skipped (integer export covers N2UQ models and their ablations, not --method ${TAG%%_*})"
elif [ "$FRESH" = 0 ] && [ "$EXPORT_LOG" -nt "$BEST" ] && [ "$EXPORT_LOG" -nt "$DATA/val" ] &&
        grep -q "^formats: $FORMATS\$" "$EXPORT_LOG" &&
        grep -q '^all exports verified' "$EXPORT_LOG"; then
    say "export: up to date ($EXPORTS)"
else
    say "export: $FORMATS, each checked against the PyTorch model (log: $EXPORT_LOG)"
    echo "formats: $FORMATS" >"$EXPORT_LOG"
    "$PY" "$REPO/scripts/export.py" --checkpoint "$BEST" --out "$EXPORTS" --format "$FORMATS" --data "$DATA" \
        ${EXPORT_ARGS[@]+"${EXPORT_ARGS[@]}"} >>"$EXPORT_LOG" 2>&1 || fail "export" "$(log_reason "$EXPORT_LOG")" "$EXPORT_LOG"
fi
ONNX_LINE="$(grep -as '^val top-1 over' "$EXPORT_LOG" | sed -E 's/^val top-1 over ([0-9]+) images: /\1 val images: /' || true)"
ONNX_TOP1="$(sed -nE 's/^  ONNX exact export \(onnxruntime\) ([0-9.]+%).*/\1/p' "$EXPORT_LOG" 2>/dev/null | head -n 1 || true)"
[ -z "$ONNX_LINE" ] || say "export: top-1 on $ONNX_LINE"
T_EXPORT=$((SECONDS - T))

# ---------------------------------------------------------------- summary
if [ "$ENV_MODE" = venv ]; then PYCMD=.venv/bin/python TBCMD=.venv/bin/tensorboard; else PYCMD=python3 TBCMD=tensorboard; fi
files=""
for f in "$EXPORTS"/*; do [ -f "$f" ] && files+="${files:+, }$(basename "$f") ($(du -h "$f" | cut -f1))"; done
{
    say ""
    say "Done in $(elapsed $((SECONDS - T0))) (setup $(elapsed "$T_SETUP"), data $(elapsed "$T_DATA")," \
        "train $(elapsed "$T_TRAIN"), evaluate $(elapsed "$T_EVAL"), export $(elapsed "$T_EXPORT"))."
    say "W${BITS}A${BITS} $ARCH, $METHOD, Fashion-MNIST $N_TRAIN train / $N_VAL val images, $EPOCHS_TEXT:" \
        "top-1 $TOP1%, top-5 $TOP5%${ONNX_TOP1:+ (integer ONNX model in onnxruntime: $ONNX_TOP1)}"
    say "  checkpoint   $BEST (and checkpoint.pth.tar, metrics.jsonl beside it)"
    say "  logs         $LOGDIR/ (train.log, evaluate.log, export.log)"
    say "  TensorBoard  $TBCMD --logdir $RUNDIR/tb"
    say "  exports      ${files:+$EXPORTS/: }${files:-none}"
    say "Next:"
    say "  bash demo.sh --bits 4    # W4A4; also --bits 3, --arch resnet34, --quantize-downsample, --epochs 12"
    say "  $PYCMD -m pip install -e \".[dev]\" && $PYCMD -m pytest -q    # the tests"
    say "  DATA=/data/imagenet bash resnet/run.sh resnet18 2 0    # the paper's ImageNet training (docs/training.md)"
    say "  $PYCMD scripts/reproduce_tables.py --models models/ --data /data/imagenet" \
        "   # the released checkpoints (models/README.md)"
} | tee "$LOGDIR/summary.txt"
