#!/usr/bin/env bash
# One-command GPU benchmark of the SORS fast paths: SORS-ResNet-18 at CIFAR shapes, batch 128 (step
# ratio vs vanilla, speedup vs the sequential reference, images/s, peak memory), EOT-PGD batched vs
# sequential, the fast-path ablation, PGD images/s; then SORS-LeNet-5; then a data-parallel training
# step over NCCL (bench/dp_step.py: one rank per GPU, at most two; SORS-ResNet-18, batch 128 each;
# ranks checked bit-identical), written to $OUT/dp_step.json.
#
# Runs from a bare checkout on a machine that has torch (no install of this package: PYTHONPATH=.),
# finishes within 8 minutes (hard limits below), and writes gpu_bench.json / gpu_bench.txt to $OUT
# when that is set (else the table goes to stdout only). Extra arguments go to bench/gpu_bench.py
# (e.g. --device cpu --quick for a dry run without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then  # the first interpreter on PATH that has torch
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then PYTHON="$candidate"; break; fi
  done
fi
if [ -z "${PYTHON:-}" ]; then echo "gpu_bench: no python with torch on PATH (set PYTHON=...)" >&2; exit 2; fi
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# 290 s hard stop (5 min incl. start-up); the script itself skips cases after its 250 s budget.
timeout -k 10 290 "$PYTHON" -m bench.gpu_bench "$@"
status=$?
if [ "$status" -eq 124 ]; then echo "gpu_bench: stopped at the 290 s limit; partial results kept" >&2; fi
# The NCCL data-parallel step (DP_STEP_ARGS="--device cpu --model resnet18 --batch 4" for a dry run).
timeout -k 10 170 "$PYTHON" -m bench.dp_step ${DP_STEP_ARGS:-}
dp_status=$?
if [ "$dp_status" -ne 0 ]; then echo "gpu_bench: data-parallel step exited $dp_status" >&2; fi
[ "$status" -ne 0 ] && exit "$status"
exit "$dp_status"
