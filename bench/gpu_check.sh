#!/usr/bin/env bash
# One prepared GPU check (< 10 min on one H100): base preset, nccl, world size 1, bf16 — samples/s,
# peak GPU memory and the async checkpoint stall/commit from GPU memory; then bench/gpu_models.py.
# On the lent device machine, diffusers, pydantic, pydantic-core, annotated-types, typing-inspection,
# crc32c and importlib-metadata travel as wheels in .whl (see docs/benchmarks.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m torch.distributed.run --standalone --nproc-per-node=1 bench/gpu_check.py
# The model families with bf16 and compile, and the warm-process restart on CUDA (< 5 min;
# transformers is in the device image).
exec python3 bench/gpu_models.py
