"""Sampling throughput on SmolLM2-135M-Instruct, side by side in one run:
(a) msp-jax `sampling.generate` (one jitted while_loop, fp32), (b) transformers `model.generate` (torch, fp32).

  python benchmarks/generate.py [--batch 8 64] [--new_tokens 64] [--prompt_len 16] [--reps 3]
      [--prefix_tokens 0] [--top_k 0] [--top_p 1.0] [--skip_hf] [--dtype fp32] [--peak_tflops T] [--json out.json]

Same GGUF weights and the same random-token prompts for both; settings as the anchor
/work/shared/bench/generate_throughput.py: ancestral sampling (temperature 1, top_k 0, top_p 1 by
default, set explicitly on both sides so HF's generation config injects nothing), exactly
`new_tokens` per row (ours: no EOS; HF: min_new_tokens = max_new_tokens), torch threads = cores.
Throughput = batch * new_tokens / median seconds over `reps` timed calls after one warm-up (ours:
the first call). Our trace + lower and XLA compile are timed separately (explicit
`.lower().compile()`), and so is the first call. `--prefix_tokens P` prepends P random soft-prompt
embeddings (ours: embedded_prefix; HF: inputs_embeds = [prefix, embed(ids)]).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

import jax
import jax.numpy as jnp
import numpy as np

import msp_jax
from msp_jax import sampling
from msp_jax.models import weights
from benchmarks.forward import median_seconds, synced, torch_model
from benchmarks.machine import add_backbone_argument, describe, flops_per_token, utilisation


def make_inputs(batch, prompt_len, prefix_tokens, vocab, hidden, seed=0):
  """Prompt ids [B, T] (no special ids 0..2) and a prefix [B, P, D] (None if P = 0), shared by both sides."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (batch, prompt_len)).astype(np.int32)
  prefix = rng.uniform(-0.05, 0.05, (batch, prefix_tokens, hidden)).astype(np.float32) if prefix_tokens else None
  return ids, prefix


def matmul_bound(config, batch: int, dtype, reps: int) -> float:
  """New tokens/s that the weight matmuls alone allow: one decode step's matmuls at this batch (every
  layer's q, k, v, o, gate, up, down, then the LM head), chained, jitted, timed. Attention over the
  cache, sampling and the cache writes are what the sampler adds on top."""
  d, q, kv, ff = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, \
      config.intermediate_size
  rng = np.random.default_rng(0)
  w = lambda *shape: jnp.asarray(rng.uniform(-0.05, 0.05, shape), dtype)
  layers = [dict(q=w(d, q), k=w(d, kv), v=w(d, kv), o=w(q, d), gate=w(d, ff), up=w(d, ff), down=w(ff, d))
            for _ in range(config.num_layers)]
  head = w(d, config.vocab_size)

  @jax.jit
  def step(x, layers, head):
    for p in layers:
      attn = (x @ p["q"]) + jnp.tile(x @ p["k"] + x @ p["v"], q // kv)  # same FLOPs as the three projections
      x = x + attn @ p["o"]
      x = x + (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]
    return x @ head

  x = w(batch, d)
  seconds = median_seconds(lambda: step(x, layers, head).block_until_ready(), max(reps, 5))
  return batch / seconds


def time_ours(model, ids, prefix, config, reps):
  """Median seconds, all timed seconds, and the compile costs: trace + lower, XLA compile (explicit,
  as jit does on a first call), the first real call, and compilations (traces) this shape added."""
  ids_j, mask_j = jnp.asarray(ids), jnp.ones(ids.shape, bool)
  prefix_j = None if prefix is None else jnp.asarray(prefix)
  calls, times = [0], []

  def run():
    calls[0] += 1  # a fresh key per call, as a real caller would pass
    start = time.perf_counter()
    out = sampling.generate(model, ids_j, mask_j, config, rng=jax.random.key(calls[0]), embedded_prefix=prefix_j)
    out.block_until_ready()
    times.append(time.perf_counter() - start)
    return out

  before = sampling.compilations()
  start = time.perf_counter()
  lowered = sampling._generate.lower(model, ids_j, mask_j, jax.random.key(0), prefix_j, None, config=config)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - start
  out = run()
  assert out.shape == (ids.shape[0], config.max_new_tokens), out.shape
  seconds = median_seconds(run, reps, warmup=0)
  return seconds, times[1:], dict(trace_lower_s=round(lower_s, 3), compile_s=round(compile_s, 3),
                                  first_call_s=round(times[0], 3), compilations=sampling.compilations() - before)


def load_hf(threads, source=weights.DEFAULT_BACKBONE, device="cpu"):
  import torch
  torch.set_num_threads(threads)
  return torch_model(source, device).eval()


def time_hf(model, ids, prefix, args, reps):
  import torch
  device = model.device
  ids_t = torch.tensor(ids, dtype=torch.long, device=device)
  mask = torch.ones_like(ids_t)
  kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True, temperature=1.0,
            top_k=args.top_k, top_p=args.top_p, pad_token_id=0)
  if prefix is None:
    inputs = {"input_ids": ids_t, "attention_mask": mask}
  else:  # decoder-only generate from embeddings returns only the new tokens
    with torch.inference_mode():
      embeds = model.get_input_embeddings()(ids_t)
      embeds = torch.cat([torch.tensor(prefix, dtype=embeds.dtype, device=device), embeds], dim=1)
    inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=device)}
  torch.manual_seed(0)
  new = args.new_tokens + (ids.shape[1] if prefix is None else 0)

  def run():
    with torch.inference_mode():
      out = model.generate(**inputs, **kw)
    assert out.shape == (ids.shape[0], new), out.shape
    return out

  return median_seconds(synced(run, str(device)), reps, warmup=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[8, 64])
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--prefix_tokens", type=int, default=0)
  parser.add_argument("--top_k", type=int, default=0, help="0 = off, as the anchor")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: cores)")
  parser.add_argument("--skip_hf", action="store_true", help="e.g. on an accelerator machine")
  parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (bf16: GPU/TPU)")
  parser.add_argument("--peak_tflops", type=float, help="the device's peak, for MFU (H100/H200 bf16 dense: 989)")
  parser.add_argument("--torch_device", default="cpu", help="where HF generate runs: cpu (fp32) or cuda (bf16)")
  add_backbone_argument(parser)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  machine = describe()
  print(machine, flush=True)

  dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
  backbone = msp_jax.load_backbone(args.backbone, dtype=dtype, with_tokenizer=False)
  vocab, hidden = backbone.config.vocab_size, backbone.config.hidden_size
  config = sampling.DecodeConfig(max_new_tokens=args.new_tokens, do_sample=True, temperature=1.0, top_k=args.top_k,
                                 top_p=args.top_p, eos_ids=())
  hf = None if args.skip_hf else load_hf(args.threads, args.backbone, args.torch_device)
  result = {**machine, "dtype": args.dtype,
            "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "prefix_tokens": args.prefix_tokens,
            "top_k": args.top_k, "top_p": args.top_p, "temperature": 1.0, "reps": args.reps, "runs": []}
  if hf is not None:
    import torch
    import transformers
    result.update(torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads())
  for b in args.batch:
    ids, prefix = make_inputs(b, args.prompt_len, args.prefix_tokens, vocab, hidden)
    tokens = b * args.new_tokens
    seconds, times, compiled = time_ours(backbone.model, ids, prefix, config, args.reps)
    run = {"batch": b, "ours_s": round(seconds, 4), "ours_tok_s": round(tokens / seconds, 1),
           "ours_times_s": [round(t, 3) for t in times], **{f"ours_{k}": v for k, v in compiled.items()}}
    context = args.prefix_tokens + args.prompt_len + args.new_tokens / 2  # the mean context of a new token
    run.update(utilisation(tokens * flops_per_token(backbone.config, context), seconds, args.peak_tflops))
    run["matmul_bound_tok_s"] = round(matmul_bound(backbone.config, b, dtype, args.reps), 1)
    run["ours_over_matmul_bound"] = round(run["ours_tok_s"] / run["matmul_bound_tok_s"], 3)
    print(run, flush=True)
    if hf is not None:
      hf_s = time_hf(hf, ids, prefix, args, args.reps)
      run.update(hf_s=round(hf_s, 4), hf_tok_s=round(tokens / hf_s, 1), ours_over_hf=round(hf_s / seconds, 3))
      print(run, flush=True)
    result["runs"].append(run)
  result["compilations_total"] = sampling.compilations()
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  print("\n| what | ours tok/s | HF tok/s | ours/HF | matmul bound tok/s | ours/bound |\n|---|---|---|---|---|---|")
  for run in result["runs"]:
    what = f"sample b={run['batch']} T={args.prompt_len}+{args.new_tokens}" + (
        f" P={args.prefix_tokens}" if args.prefix_tokens else "")
    print(f"| {what} | {run['ours_tok_s']} | {run.get('hf_tok_s', '-')} | {run.get('ours_over_hf', '-')} | "
          f"{run['matmul_bound_tok_s']} | {run['ours_over_matmul_bound']} |")
  for r in result["runs"]:
    print(f"ours b={r['batch']}: trace+lower {r['ours_trace_lower_s']} s, XLA compile {r['ours_compile_s']} s, "
          f"first call {r['ours_first_call_s']} s, compilations {r['ours_compilations']}")


if __name__ == "__main__":
  main()
