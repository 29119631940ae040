#!/usr/bin/env bash
# One prepared GPU check (< 5 min on one H100): base preset, nccl, world size 1, bf16.
# Prints samples/s, peak GPU memory and the async checkpoint stall/commit from GPU memory.
# On the lent device machine, diffusers, pydantic, pydantic-core, annotated-types, typing-inspection,
# crc32c and importlib-metadata travel as wheels in .whl (see docs/benchmarks.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 -m torch.distributed.run --standalone --nproc-per-node=1 bench/gpu_check.py
