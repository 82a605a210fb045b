#!/usr/bin/env bash
# One prepared GPU check: smoke-test `standard` in bf16 for a few hundred steps and report
# throughput and MFU. Run from the repository root on a machine with an NVIDIA GPU and a CUDA
# build of torch installed (then `pip install -e .`):
#   bash benchmarks/bench_gpu.sh [STEPS]
set -euo pipefail
STEPS=${1:-300}
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.version.cuda)"
"$PY" benchmarks/bench_gpu.py --steps "$STEPS" --json
