"""The per-token sampling ops on SmolLM2's vocabulary, ours vs the textbook forms, in one run:

  top-p   `sampling.apply_top_p` (bisection, no sort) vs HF's algorithm in JAX (argsort, cumsum, argsort back)
  draw    `sampling.sample` (inverse CDF, one uniform per row) vs `jax.random.categorical` (Gumbel noise per token)
  both    `sampling.sample_top_p` (what the sampler runs: candidates by rejection) vs the cut then the draw

  python benchmarks/sampling_ops.py [--batch 16 64] [--reps 9] [--top_p 0.95] [--json out.json]

Random logits (normal, scale 3) [batch, 49152]; median of `reps` jitted calls after one warm-up each,
alternating ours and the reference. Both top-p forms drop the same tokens (checked here). The grid
samples with top_p 0.95 at every decode step, so these costs add to each step's forward.
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

from benchmarks.machine import describe
from msp_jax import sampling

VOCAB = 49152


def sorted_top_p(logits, p):
  """HF's `TopPLogitsWarper` written directly in JAX: the sort-based reference."""
  order = jnp.argsort(logits, axis=-1)
  cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
  drop_sorted = (cumulative <= 1 - p).at[..., -1].set(False)
  drop = jnp.take_along_axis(drop_sorted, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(drop, -jnp.inf, logits)


def timed(fns: dict, x, reps: int) -> dict:
  for f in fns.values():
    f(x).block_until_ready()
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      start = time.perf_counter()
      f(x).block_until_ready()
      times[k].append(time.perf_counter() - start)
  return {k: statistics.median(v) for k, v in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
  parser.add_argument("--reps", type=int, default=9)
  parser.add_argument("--top_p", type=float, default=0.95)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  machine = describe()
  print(f"machine: {machine['cpu']} ({machine['cpu_kind']}, {machine['cores']} cores)", flush=True)
  key = jax.random.key(0)
  rows = []
  for batch in args.batch:
    x = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, VOCAB)).astype(np.float32) * 3)
    ours_p, theirs_p = jax.jit(lambda l: sampling.apply_top_p(l, args.top_p)), jax.jit(lambda l: sorted_top_p(l, args.top_p))
    same = bool((jnp.isinf(ours_p(x)) == jnp.isinf(theirs_p(x))).all())
    t = timed({"top_p_ours": ours_p, "top_p_sorted": theirs_p,
               "draw_ours": jax.jit(lambda l: sampling.sample(key, l)),
               "draw_categorical": jax.jit(lambda l: jax.random.categorical(key, l, axis=-1)),
               "top_p_draw_ours": jax.jit(lambda l: sampling.sample_top_p(key, l, args.top_p)),
               "cut_then_draw": jax.jit(lambda l: sampling.sample(key, sampling.apply_top_p(l, args.top_p)))},
              x, args.reps)
    row = {"batch": batch, **{k: round(v * 1e3, 2) for k, v in t.items()}, "same_tokens_dropped": same}
    rows.append(row)
    print(f"batch {batch}: top-p {row['top_p_ours']} ms vs sorted {row['top_p_sorted']} ms "
          f"({t['top_p_sorted'] / t['top_p_ours']:.1f}x); draw {row['draw_ours']} ms vs categorical "
          f"{row['draw_categorical']} ms ({t['draw_categorical'] / t['draw_ours']:.1f}x); same tokens dropped: {same}; "
          f"top-p draw {row['top_p_draw_ours']} ms vs cut then draw {row['cut_then_draw']} ms",
          flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine, "top_p": args.top_p, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
