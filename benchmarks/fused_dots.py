"""Would fusing SmolLM2's projections help on this CPU? Separate vs concatenated weight dots over 30 layers.

  python benchmarks/fused_dots.py [--reps 7]

q/k/v as three dots vs one [576, 960] dot, and gate/up as two dots vs one [576, 3072] dot, each in a
lax.scan over 30 stacked layers on 8 x 128 rows (the forward's shape); median ms of `reps` after a warm-up,
printed twice (the second line shows the machine's drift). Fusing pays only if the fused column is lower.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import describe

LAYERS, D, HEADS, KV_HEADS, HEAD_DIM, MLP = 30, 576, 9, 3, 64, 1536


def scan(body, x, weights):
  return jax.lax.scan(lambda h, w: (h + 1e-3 * body(h, w), None), x, weights)[0]


@jax.jit
def qkv_separate(x, wq, wk, wv):
  dot = lambda h, w: jnp.einsum("btd,dhk->bthk", h, w).sum()
  return scan(lambda h, w: dot(h, w[0]) + dot(h, w[1]) + dot(h, w[2]), x, (wq, wk, wv))


@jax.jit
def qkv_fused(x, w):
  def body(h, w):
    y = h @ w
    q, k, v = y[..., :HEADS * HEAD_DIM], y[..., HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM], y[..., (HEADS + KV_HEADS) * HEAD_DIM:]
    return q.sum() + k.sum() + v.sum()
  return scan(body, x, w)


@jax.jit
def gate_up_separate(x, wg, wu):
  return scan(lambda h, w: (jax.nn.silu(h @ w[0]) * (h @ w[1])).sum(), x, (wg, wu))


@jax.jit
def gate_up_fused(x, w):
  def body(h, w):
    y = h @ w
    return (jax.nn.silu(y[..., :MLP]) * y[..., MLP:]).sum()
  return scan(body, x, w)


def median_ms(f, *args, reps: int) -> float:
  f(*args).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    f(*args).block_until_ready()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=7)
  args = parser.parse_args()
  print(describe(), flush=True)
  rng = np.random.default_rng(0)
  array = lambda *shape: jnp.asarray(rng.standard_normal(shape) * 0.02, jnp.float32)
  x = array(8, 128, D)
  wq, wk, wv = array(LAYERS, D, HEADS, HEAD_DIM), array(LAYERS, D, KV_HEADS, HEAD_DIM), array(LAYERS, D, KV_HEADS, HEAD_DIM)
  w_qkv = jnp.concatenate([w.reshape(LAYERS, D, -1) for w in (wq, wk, wv)], -1)
  wg, wu = array(LAYERS, D, MLP), array(LAYERS, D, MLP)
  w_gate_up = jnp.concatenate([wg, wu], -1)
  print("| run | q/k/v: 3 dots | 1 fused | gate/up: 2 dots | 1 fused |\n|---|---|---|---|---|")
  for run in (1, 2):
    ms = [median_ms(qkv_separate, x, wq, wk, wv, reps=args.reps), median_ms(qkv_fused, x, w_qkv, reps=args.reps),
          median_ms(gate_up_separate, x, wg, wu, reps=args.reps), median_ms(gate_up_fused, x, w_gate_up, reps=args.reps)]
    print(f"| {run} | " + " | ".join(f"{m:.1f} ms" for m in ms) + " |", flush=True)


if __name__ == "__main__":
  main()
