#!/usr/bin/env bash
# The card's platform: forward, prompt-only train step and sampler on one GPU, bf16, with MFU.
#
#   bash benchmarks/gpu.sh            # after `make run` (or `make .venv/.runtime`) on a machine with an NVIDIA GPU
#   PY=python3 PEAK_TFLOPS=989 OUT=gpu-results bash benchmarks/gpu.sh
#
# PEAK_TFLOPS is the dense bf16 peak of the card, for MFU (H100/H200 SXM: 989; A100: 312). Torch and HF
# baselines are skipped: they measure the CPU here. JSON results go to $OUT; the tables print as it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK=${PEAK_TFLOPS:-989}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
"$PY" -c "import jax; b = jax.default_backend(); assert b == 'gpu', f'jax sees {b}, not a GPU (make run installs the CUDA build where nvidia-smi works)'; print(jax.devices())"
"$PY" benchmarks/forward.py --skip_torch --dtypes bf16 fp32 --batch 32 --seq 512 --reps 20 --peak_tflops "$PEAK" --json "$OUT/forward.json"
"$PY" benchmarks/train_step.py --skip_torch --dtype bf16 --batch 32 --seq 512 --prompt_tokens 20 100 --reps 20 \
  --peak_tflops "$PEAK" --json "$OUT/train_step.json"
"$PY" benchmarks/generate.py --skip_hf --dtype bf16 --batch 8 64 256 --new_tokens 64 --reps 5 \
  --peak_tflops "$PEAK" --json "$OUT/generate.json"
