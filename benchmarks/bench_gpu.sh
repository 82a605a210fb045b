#!/usr/bin/env bash
# One prepared GPU check: smoke-test `standard` in bf16 for a few hundred steps and report
# throughput and MFU. Run from the repository root on a machine with an NVIDIA GPU and a CUDA
# build of torch:
#   bash benchmarks/bench_gpu.sh [STEPS]
# Nothing is installed from a registry: gmmt is imported from this checkout (PYTHONPATH), and
# any of its dependencies the machine lacks (on the lent GPU image: cattrs) come as wheels in
# .whl/, made beforehand on a machine with internet access:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl cattrs==26.2.1
# The JSON report is printed and written to $OUT/gpu.json (default benchmarks/results/).
set -euo pipefail
STEPS=${1:-300}
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gmmt-site .whl/*.whl
  export PYTHONPATH="/tmp/gmmt-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.version.cuda)"
mkdir -p "$OUT_DIR"
"$PY" benchmarks/bench_gpu.py --steps "$STEPS" --json | tee "$OUT_DIR/gpu.json.part"
mv "$OUT_DIR/gpu.json.part" "$OUT_DIR/gpu.json"
