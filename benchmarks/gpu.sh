#!/usr/bin/env bash
# The GPU checks in one go (about 3-4 minutes on one H100/H200-class GPU): fused SDPA backends at d = 512,
# exact and IVF aggregation (lists and groups) in fp32 / fp16 / bf16 against the GEMM rate, Ex-MCR training steps in fp32 /
# fp16 (loss scaling) / bf16, and a tiny CLIP encoder in fp16. Uses the repository's .venv when it has a
# CUDA torch, else the python on PATH (GPU machines usually have torch; nothing is downloaded).
#   bash benchmarks/gpu.sh [--memory 1300000] [--queries 65536]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=.venv/bin/python
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
exec timeout 290 "$PY" benchmarks/gpu.py --device cuda "$@"
