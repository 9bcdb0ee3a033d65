#!/usr/bin/env bash
# Wheels that the device machine's python3 (3.12: jax + CUDA, flax, optax, orbax, pyyaml, sentencepiece) lacks
# and the E-step section of benchmarks/gpu_check.py imports (grain, tensorflow-datasets and what they need that
# is not there), downloaded HERE into .whl/ (ignored through .git/info/exclude). Then carry it:
#   bash benchmarks/device_wheels.sh      # here, once (PyPI); ~12 MB
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl"]   (gpu_check.sh installs .whl/ first)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PY=${PYTHON:-.venv/bin/python}
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLAT+=(--platform "$p")
done
# the versions pinned in this project's venv (pyproject.toml pins grain and tensorflow-datasets)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorflow-datasets==4.9.10 dm-tree==0.1.10 \
  immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0 tensorflow-metadata==1.21.0 \
  googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
"$PY" -m pip wheel -q --no-deps -w .whl promise==2.3 # published as a source archive only: a pure-Python wheel
du -sh .whl
