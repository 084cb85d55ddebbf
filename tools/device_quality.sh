#!/usr/bin/env bash
# The issue-16 quality rows (bench/quality.py --rows overlap3) on a lent machine's CPU cores,
# several 4-rank runs at once (one thread per rank, gloo, no GPU), in priority order; runs
# not started by QUALITY_LAUNCH_S seconds are left out. Writes tables and every run's
# metrics to OUT_DIR.    bash tools/device_quality.sh [OUT_DIR]
set -u
out=${1:-${OUT:-device_quality_out}}
mkdir -p "$out"
PY=${PY:-python3}
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ -e thinwire/configs ] || ln -s ../configs thinwire/configs
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled CUDA_VISIBLE_DEVICES=
cores=$(nproc)
jobs=${QUALITY_JOBS:-$(( cores / 4 > 0 ? cores / 4 : 1 ))}
{ lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket'; "$PY" -c 'import torch; print("torch", torch.__version__)'
  echo "jobs $jobs"; } | tee "$out/machine.txt"
runs=/tmp/quality_runs
args=(--rows "${QUALITY_ROWS:-overlap3}" --steps "${QUALITY_STEPS:-1200}" --eval-every "${QUALITY_EVAL_EVERY:-300}"
      --runs-dir "$runs" --tag "${QUALITY_TAG:-overlap3_device}")
timeout "${QUALITY_S:-520}" "$PY" bench/quality.py "${args[@]}" --jobs "$jobs" --deadline "${QUALITY_LAUNCH_S:-380}" \
  --launch dist.threads=1 dist.backend=gloo 2>&1 | tee "$out/quality_log.txt"
"$PY" bench/quality.py "${args[@]}" --report > "$out/quality_report.txt" 2>&1
cp bench/results/quality/"${QUALITY_TAG:-overlap3_device}".* "$out/" 2>/dev/null
for d in "$runs"/*/; do  # metrics and overrides only (no checkpoints)
  mkdir -p "$out/runs/$(basename "$d")"; cp "$d"/metrics.jsonl "$d"/overrides.json "$out/runs/$(basename "$d")/" 2>/dev/null
done
echo done
