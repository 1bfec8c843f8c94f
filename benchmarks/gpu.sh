#!/usr/bin/env bash
# The GPU checks in one go (about 3-4 minutes on one H100/H200-class GPU): fused SDPA backends at d = 512,
# exact and IVF aggregation (lists and groups) in fp32 / fp16 / bf16 against the GEMM rate, Ex-MCR
# training steps in fp32 / fp16 (loss scaling) / bf16, and a tiny CLIP encoder in fp16. Uses the
# repository's .venv when it has a CUDA torch, else the python on PATH (GPU machines usually have torch;
# nothing is downloaded). The IVF parts need faiss (faiss-cpu: the partition's k-means; the kernels are
# torch's): on a machine without it and without network, `pip download --no-deps faiss-cpu -d DIR`
# elsewhere and pass --wheels DIR, which installs DIR's wheels into a temporary folder for this run only.
#   bash benchmarks/gpu.sh [--wheels DIR] [--memory 1300000] [--queries 65536]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=.venv/bin/python
fi
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--wheels" ]; then wheels="${2:?--wheels needs a folder of .whl files}"; shift 2; else args+=("$1"); shift; fi
done
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
if [ -n "${wheels:-}" ]; then
  site="$(mktemp -d)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import faiss" 2>/dev/null || echo "faiss is not importable: the IVF parts will be skipped (pip install faiss-cpu, or --wheels DIR)"
exec timeout 290 "$PY" benchmarks/gpu.py --device cuda ${args[@]+"${args[@]}"}
