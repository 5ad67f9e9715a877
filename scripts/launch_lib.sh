# shellcheck shell=bash
# Shared by resnet/run.sh and mobilenetv2/run.sh (sourced, not run): choose the number of
# processes, check the flags once, launch train.py (torchrun when several processes), tee the log
# to log/<run folder name>.txt. Needs: PYTHON, die(). Reads: NPROC, TORCHRUN_ARGS.

# The run-folder tag of --method and N2UQ's ablation and variant flags among "$@", followed by "_"
# (as n2uq.train_state.run_name puts it, e.g. "lsq_"); empty for plain N2UQ.
method_tag() {
    local method=n2uq uniform="" maxabs="" full_lr="" prev="" arg tag
    for arg in "$@"; do
        [ "$prev" = --method ] && method="$arg"
        case "$arg" in
            --method=*) method="${arg#--method=}";;
            --uniform_thresholds) uniform="-uniform-thresholds";;
            --maxabs_weights) maxabs="-maxabs-weights";;
            --full_lr_thresholds) full_lr="-full-lr-thresholds";;
        esac
        prev="$arg"
    done
    tag="$method$uniform$maxabs$full_lr"
    if [ "$tag" != n2uq ]; then echo "${tag}_"; fi
}

# The method a method_tag stands for, as the paper names it: "N2UQ", "LSQ", "PACT", "DoReFa-Net",
# with N2UQ's ablations after it ("N2UQ with uniform thresholds, max-abs weights").
method_name() {
    local tag="${1%_}" name ablations=()
    case "${tag%%-*}" in
        ""|n2uq) name=N2UQ;; lsq) name=LSQ;; pact) name=PACT;; dorefa) name=DoReFa-Net;; *) name="${tag%%-*}";;
    esac
    case "$tag" in *-uniform-thresholds*) ablations+=("uniform thresholds");; esac
    case "$tag" in *-maxabs-weights*) ablations+=("max-abs weights");; esac
    case "$tag" in *-full-lr-thresholds*) ablations+=("full-lr thresholds");; esac
    if [ ${#ablations[@]} -gt 0 ]; then
        local IFS=,
        name+=" with ${ablations[*]}"
        name="${name//,/, }"
    fi
    echo "$name"
}

# launch_training SCRIPT [train.py flags]: the log is named after the run folder SCRIPT --check_only
# names (n2uq.train_state.run_name, or <arch>_fp), so the two never disagree.
launch_training() {
    local script="$1"; shift
    local nproc nnodes=1 status ngpu checked run_dir log
    ngpu="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
    if [ -n "${NPROC:-}" ]; then
        [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"
        nproc="$NPROC"
    else
        nproc=$((ngpu > 0 ? ngpu : 1))
    fi
    if [ "$ngpu" = 0 ]; then
        # CPU training: idle OpenMP threads sleep instead of spinning, which keeps a shared or
        # oversubscribed machine from wasting most of its cycles (a step ran 10x slower otherwise).
        export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
    fi
    if [[ "${TORCHRUN_ARGS:-}" =~ --nnodes[=\ ]+([0-9]+) ]]; then nnodes="${BASH_REMATCH[1]}"; fi
    # Flags and data layout are checked before any process starts: one clear line on a bad input.
    checked="$(WORLD_SIZE=$((nproc * nnodes)) "$PYTHON" "$script" "$@" --check_only)" || exit $?
    echo "$checked"
    run_dir="$(sed -n 's/^  checkpoints: \(.*\) (--save is writable)$/\1/p' <<<"$checked")"
    [ -n "$run_dir" ] || die "$script --check_only named no run folder; cannot name the log"
    log="log/$(basename "$run_dir").txt"
    mkdir -p "$(dirname "$log")"
    echo "log: $log"
    local cmd
    if [ "$nproc" -gt 1 ] || [ -n "${TORCHRUN_ARGS:-}" ]; then
        # shellcheck disable=SC2086,SC2206  # TORCHRUN_ARGS is a list of flags
        cmd=("$PYTHON" -m torch.distributed.run ${TORCHRUN_ARGS:---standalone} --nproc_per_node "$nproc" "$script" "$@")
    else
        cmd=("$PYTHON" "$script" "$@")
    fi
    echo "$(date '+%F %T') ${cmd[*]}" >> "$log"
    # On SIGTERM/SIGINT (a scheduler or Ctrl-C signals the whole group) the training processes
    # save a checkpoint and exit: this shell waits for them and tee keeps logging until they do.
    set +e
    trap ':' INT TERM
    "${cmd[@]}" 2>&1 | (trap '' INT TERM; exec tee -a "$log")
    status=${PIPESTATUS[0]}
    trap - INT TERM
    set -e
    return "$status"
}
