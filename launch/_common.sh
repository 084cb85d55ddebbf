# Shared by launch/torchrun.sh and launch/multinode.sh (sourced, not run).
# shellcheck shell=bash

# default_nproc: workers per node when NPROC is unset: the GPUs nvidia-smi lists, else 1.
default_nproc() {
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || n=1
    echo "$n"
}

# run_or_print CMD...: with DRY_RUN=1 print CMD on one line (shell-quoted), else exec it.
run_or_print() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        local line
        line=$(printf '%q ' "$@")
        echo "${line% }"
    else
        exec "$@"
    fi
}
