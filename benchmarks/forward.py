"""Forward throughput of SmolLM2-135M-Instruct: msp-jax (fp32, bf16) vs transformers (torch, fp32).

  python benchmarks/forward.py [--batch 8] [--seq 128] [--reps 7] [--dtypes fp32 bf16] [--skip_torch]
      [--peak_tflops T] [--json out.json]

Same GGUF weights, same random-token batch, one process, one model at a time; median of `reps`
timed forwards after 2 warm-ups, each `block_until_ready`. Prints the machine (CPU kind), tokens/s,
achieved TFLOP/s (and MFU with --peak_tflops) and our/torch time ratio.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

import jax
import jax.numpy as jnp
import numpy as np

import msp_jax
from benchmarks.machine import add_backbone_argument, describe, flops_per_token, utilisation
from msp_jax.models import weights


def median_seconds(fn, reps, warmup=2):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_ours(ids, dtype, reps, source=weights.DEFAULT_BACKBONE):
  """(median seconds, the backbone's config)."""
  backbone = msp_jax.load_backbone(source, dtype=dtype, with_tokenizer=False)
  forward = jax.jit(lambda m, i: m(i))  # weights as arguments, never baked into the executable
  ids = jnp.asarray(ids)
  return median_seconds(lambda: forward(backbone.model, ids).block_until_ready(), reps), backbone.config


def torch_model(source=weights.DEFAULT_BACKBONE, device="cpu"):
  """The same backbone as a transformers model (a GGUF file through its GGUF loader, or an HF folder):
  fp32 on the CPU, bf16 on a GPU (as ours is on each)."""
  import torch
  import transformers
  path = weights.resolve(source)
  folder, name = os.path.split(path) if path.endswith(".gguf") else (path, None)
  dtype = torch.float32 if device == "cpu" else torch.bfloat16
  return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).to(device)


def synced(fn, device):
  """`fn`, then a wait for the device: CUDA calls return before their work is done."""
  import torch

  def run():
    out = fn()
    if device != "cpu":
      torch.cuda.synchronize()
    return out

  return run


def time_torch(ids, reps, source=weights.DEFAULT_BACKBONE, device="cpu"):
  import torch
  model = torch_model(source, device).eval()
  ids = torch.tensor(ids, device=device)
  with torch.inference_mode():
    return median_seconds(synced(lambda: model(ids), device), reps), torch.__version__, torch.get_num_threads()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--skip_torch", action="store_true", help="e.g. on an accelerator machine")
  parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
  parser.add_argument("--peak_tflops", type=float, help="the device's peak, for MFU (H100/H200 bf16 dense: 989)")
  parser.add_argument("--torch_device", default="cpu", help="where transformers runs: cpu (fp32) or cuda (bf16)")
  add_backbone_argument(parser)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  result = describe()
  print(result, flush=True)
  ids = np.random.default_rng(0).integers(3, 49152, size=(args.batch, args.seq))
  tokens = args.batch * args.seq
  result.update(batch=args.batch, seq=args.seq)
  for dtype in args.dtypes:
    name = f"msp_jax_{dtype}"
    seconds, config = time_ours(ids, {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype], args.reps, args.backbone)
    result[name] = {"median_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                    **utilisation(tokens * flops_per_token(config, args.seq), seconds, args.peak_tflops)}
    print(name, result[name], flush=True)
  if not args.skip_torch:
    seconds, version, threads = time_torch(ids, args.reps, args.backbone, args.torch_device)
    ref = "torch_fp32" if args.torch_device == "cpu" else f"torch_bf16_{args.torch_device}"
    result[ref] = {"median_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                   "torch": version, "threads": threads}
    print(ref, result[ref], flush=True)
    for name in (f"msp_jax_{dtype}" for dtype in args.dtypes):
      result[f"{name}_time_over_torch"] = round(result[name]["median_s"] / seconds, 3)
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
