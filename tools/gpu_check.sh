#!/usr/bin/env bash
# The GPU tier and the compress-pass benchmark in one run on a CUDA machine (docs/gpu.md).
#   bash tools/gpu_check.sh [OUT_DIR]
# Installs the wheels under .whl/ (if any; a machine without a package index) into
# /tmp/site, prints every version, then runs `pytest -m gpu` and bench/compress_pass.py
# --device cuda, each under its own time limit, writing their output to OUT_DIR.
set -u
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# thinwire.configs is the repo's configs/ (pyproject's package-dir); a checkout without an install needs the link
[ -e thinwire/configs ] || ln -s ../configs thinwire/configs
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/versions.txt"
python3 - <<'PY' 2>&1 | tee -a "$out/versions.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), torch.cuda.get_device_name())
for m in ("hydra", "omegaconf", "deepspeed", "triton", "numpy", "transformers"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "unavailable:", type(e).__name__, str(e)[:200])
PY
timeout "${GPU_TIER_S:-330}" python3 -m pytest -m gpu tests/test_gpu.py -v -rA --durations=0 -p no:cacheprovider \
  ${GPU_TIER_ARGS:-} 2>&1 | tee "$out/gpu_tier.txt"
[ "${GPU_BENCH_S:-150}" = 0 ] && exit 0   # GPU_BENCH_S=0: the tier alone
timeout "${GPU_BENCH_S:-150}" python3 bench/compress_pass.py --device cuda --sizes "${GPU_SIZES:-1M,16M,64M,256M}" \
  --json "$out/compress_pass.json" 2>&1 | tee "$out/compress_pass.md"
