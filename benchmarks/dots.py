"""The matmul rate jax and torch reach on this CPU at SmolLM2-135M's shapes, side by side in one run.

  python benchmarks/dots.py [--tokens 1024 64] [--reps 7] [--json out.json]

Each row is one fp32 dot [tokens, k] x [k, n] (the q/o projections, the MLP's up and down, the LM head)
timed alone: median of `reps` after a warm-up. Where both frameworks reach the same GFLOP/s, the forward's
gap to torch is not in its dots but in what runs between them.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.forward import median_seconds
from benchmarks.machine import describe

# (k, n) of SmolLM2-135M's weight matrices: hidden 576, MLP 1,536, vocabulary 49,152
SHAPES = ((576, 576), (576, 1536), (1536, 576), (576, 49152))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 64], help="rows: 8 x 128 (forward), 64 (decode)")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--json")
  args = parser.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count())
  result = describe()
  print(result, flush=True)
  result.update(torch=torch.__version__, rows=[])
  dot = jax.jit(jnp.matmul)
  rng = np.random.default_rng(0)
  print("| m x k x n | jax GFLOP/s | torch GFLOP/s | jax / torch time |\n|---|---|---|---|")
  for m in args.tokens:
    for k, n in SHAPES:
      a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
      ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
      ours = median_seconds(lambda: dot(ja, jb).block_until_ready(), args.reps)
      with torch.no_grad():
        theirs = median_seconds(lambda: ta @ tb, args.reps)
      flops = 2 * m * k * n
      row = dict(m=m, k=k, n=n, jax_gflops=round(flops / ours / 1e9, 1), torch_gflops=round(flops / theirs / 1e9, 1),
                 jax_over_torch_time=round(ours / theirs, 3))
      print(f"| {m} x {k} x {n} | {row['jax_gflops']} | {row['torch_gflops']} | {row['jax_over_torch_time']} |", flush=True)
      result["rows"].append(row)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
