#!/usr/bin/env bash
# The card's platform: forward, prompt-only train step and sampler on one GPU, bf16, with MFU, each beside
# its PyTorch reference (transformers forward, PEFT prompt tuning, HF generate) in bf16 on the same GPU.
#
#   bash benchmarks/gpu.sh            # after `make run` (or `make .venv/.runtime`) on a machine with an NVIDIA GPU
#   PY=python3 PEAK_TFLOPS=989 OUT=gpu-results BACKBONE=path/to/hf-folder REF=none bash benchmarks/gpu.sh
#
# PEAK_TFLOPS is the dense bf16 peak of the card, for MFU (H100/H200 SXM: 989; A100: 312). BACKBONE is any
# backbone load_backbone takes (default: the SmolLM2 GGUF; benchmarks/random_checkpoint.py writes one with
# random weights where the GGUF cannot go). REF=none skips the PyTorch references (needs torch with CUDA,
# transformers, peft). JSON results go to $OUT; the tables print as it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK=${PEAK_TFLOPS:-989}
OUT=${OUT:-results/gpu}
BACKBONE=${BACKBONE:-smollm2-135m-instruct}
REF=${REF:-cuda}
ref() { if [ "$REF" = none ]; then echo "$1"; else echo "--torch_device $REF"; fi; }
mkdir -p "$OUT"
"$PY" -c "import jax; b = jax.default_backend(); assert b == 'gpu', f'jax sees {b}, not a GPU (make run installs the CUDA build where nvidia-smi works)'; print(jax.devices())"
"$PY" benchmarks/forward.py --backbone "$BACKBONE" $(ref --skip_torch) --dtypes bf16 fp32 --batch 32 --seq 512 --reps 20 \
  --peak_tflops "$PEAK" --json "$OUT/forward.json"
"$PY" benchmarks/train_step.py --backbone "$BACKBONE" $(ref --skip_torch) --dtype bf16 --batch 32 --seq 512 \
  --prompt_tokens 20 100 --reps 20 --peak_tflops "$PEAK" --json "$OUT/train_step.json"
"$PY" benchmarks/generate.py --backbone "$BACKBONE" $(ref --skip_hf) --dtype bf16 --batch 8 64 256 --new_tokens 64 \
  --top_p 0.95 --reps 5 --peak_tflops "$PEAK" --json "$OUT/generate.json"
