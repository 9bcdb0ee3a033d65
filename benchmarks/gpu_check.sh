#!/usr/bin/env bash
# The one prepared device check of issue #17 (benchmarks/gpu_check.py): on the device machine,
#   bash benchmarks/gpu_check.sh            -> $OUT/gpu_check.json (train MFU per attention implementation,
#                                              decode vs the HBM roofline, one RA3 E-step round)
#   bash benchmarks/gpu_check.sh --dry-run  -> tiny shapes, any machine (CI runs this through tests/)
# Uses the python3 there (jax + CUDA, flax, optax, orbax, pyyaml, sentencepiece); wheels it lacks (grain) travel
# in .whl/ when present (see the device README) and are installed under /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import grain, tensorflow_datasets" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT_DIR=${OUT:-runs/gpu_check}
exec timeout 480 $PY benchmarks/gpu_check.py --out "$OUT_DIR" "$@"
