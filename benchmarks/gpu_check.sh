#!/usr/bin/env bash
# GPU check: bf16 LLP at seq_len 8192, ~50 steps, DeepSpeed ZeRO-2; prints one JSON line with
# tokens/s, MFU, peak memory and the SDPA kernel that ran. On a CPU: benchmarks/gpu_check.sh --toy
# Usage: benchmarks/gpu_check.sh [--toy] [--steps N] [--nproc N] [--workdir DIR] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${LLP_PYTHON:-python3}" benchmarks/gpu_check.py "$@"
