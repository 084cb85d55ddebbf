# Shared by launch/torchrun.sh and launch/multinode.sh (sourced, not run).
# shellcheck shell=bash

# default_nproc: workers per node when NPROC is unset: the GPUs nvidia-smi lists, else 1.
default_nproc() {
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || n=1
    echo "$n"
}

# default_python: the interpreter with thinwire when PYTHON is unset: the active virtual
# environment's python, else the repo's .venv (THINWIRE_VENV; what launch/setup_env.sh made), else python.
default_python() {
    local venv
    venv=${THINWIRE_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}
    if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        echo "$VIRTUAL_ENV/bin/python"
    elif [[ -x "$venv/bin/python" ]]; then
        echo "$venv/bin/python"
    else
        echo python
    fi
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
