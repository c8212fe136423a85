#!/usr/bin/env bash
# Run ON the GPU machine, in the repository root (the device tool's working tree):
#   bash benchmarks/gpu.sh [--patches 4096]          # ~5 min on one H100/H200
# Installs the wheels carried in .whl/ (made by benchmarks/gpu_wheels.sh; nothing can be
# fetched there) into /tmp/site, generates the 40k x 30k benchmark slide, and runs
# benchmarks.gpu: nvjpeg vs CPU JPEG decode, slide -> embeddings for ResNet-50 and ViT-L/16
# in bf16 (patches/s, time in the model), peak GPU memory, precision chosen, slide -> answer
# (ViT-L/16 + CLAM-SB) against encoding alone. Results: gpu-results.json
# (in $OUT when the device tool runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m benchmarks.gpu --json "${OUT:-.}/gpu-results.json" "$@"
