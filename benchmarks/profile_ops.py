"""Where the time goes: XLA's own per-op profile of one jitted call on SmolLM2-135M-Instruct (CPU or GPU).

  python benchmarks/profile_ops.py [--what forward train_step decode_step sampling] [--batch 8] [--seq 128]
      [--prompt_tokens 20] [--decode_batch 64] [--cache 80] [--reps 3] [--top 12] [--dtype fp32]
      [--backbone B] [--json out.json]

Each call runs under `jax.profiler.trace`; every XLA op (thunk) it executed is mapped to the HLO that
made it (the compiled module's `metadata op_name`) and summed per call, then grouped by kind:

  weight matmul      a dot with a weight matrix (q/k/v/o, MLP, LM head)
  attention          the score and value dots and their softmax
  layer slicing      copying one layer's weights / cache out of the stacked [L, ...] arrays (lax.scan)
  cache / scan write writing new keys/values into the KV cache, or a scan's per-layer outputs and saved
                     activations into their stacked [L, ...] arrays (a train step's backward reads them)
  layout copy        transposes and copies XLA inserted
  other              norms, rotary, elementwise, the loss

forward: 8 x 128 fp32 (benchmarks/forward.py's shape); train_step: the prompt-only step of
benchmarks/train_step.py (prefix of --prompt_tokens, backward to the prompts only); decode_step: one
token for --decode_batch rows against a cache of --cache slots, donated as in the sampler's loop;
sampling: top-p 0.95 and the draw on those rows' logits (the rest of a sampler iteration).
On a GPU each kernel counts by the HLO op it ran for (the trace's `hlo_op`), on the device's streams only.
Op times are summed over XLA's threads (an op split over 2 cores counts twice), so compare shares;
they hold for the machine they were measured on (printed first), and under load only the shares do.
"""
import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

import jax
import jax.numpy as jnp

import msp_jax
from benchmarks.generate import make_inputs
from benchmarks.machine import add_backbone_argument, describe
from benchmarks.train_step import batch_for, prompt_step
from msp_jax import sampling
from msp_jax.models import layers

KINDS = ("weight matmul", "attention", "layer slicing", "cache / scan write", "layout copy", "other")
ATTENTION = (layers.SCORES, layers.VALUES, "softmax", "reduce_max",  # layers._attend's einsums
             "dot_product_attention")  # cuDNN's fused kernels (GPU)


def hlo_sources(compiled_text: str) -> dict[str, str]:
  """{instruction name: its op_name metadata} for every instruction of a compiled HLO module.

  A fusion that contains a dot is named by its dot: XLA:CPU fuses e.g. attention's value-dot backward with
  the softmax's backward into one op whose root is a reduce_sum, which is attention, not "other"."""
  found, calls, dots, computation = {}, {}, {}, None
  for line in compiled_text.splitlines():
    header = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
    if header:
      computation = header.group(1)
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
    if m:
      found[m.group(1)] = m.group(2)
      called = re.search(r"calls=%?([\w.\-]+)", line)
      if called:
        calls[m.group(1)] = called.group(1)
      if computation and m.group(2).endswith("dot_general"):
        dots.setdefault(computation, m.group(2))
  for op, computation in calls.items():
    found[op] = dots.get(computation, found[op])
  return found


def kind_of(op: str, source: str) -> str:
  """The kind of an XLA op, from its name and the jax source of its HLO. The source's last part is the
  primitive; "transpose(" earlier in it is autodiff's transposition (a backward pass), not a layout copy."""
  primitive = source.rsplit("/", 1)[-1]
  if any(a in source for a in ATTENTION):
    return "attention"
  if primitive == "dot_general":
    return "weight matmul"
  if primitive == "dynamic_update_slice" or "dynamic-update-slice" in op or "dynamic_update_slice" in op:
    return "cache / scan write"
  if primitive in ("dynamic_slice", "dynamic_index_in_dim") or "dynamic-slice" in op:
    return "layer slicing"
  if re.search(r"(^|[_.])(copy|transpose)", op) or primitive == "transpose":
    return "layout copy"
  return "other"


def profile(fn, args, reps: int, make_args=None) -> tuple[list[dict], float]:
  """Per-op milliseconds per call of jitted `fn` (already compiled by one warm-up call), and the
  wall milliseconds per call. `make_args()` gives fresh arguments per call (for donated buffers)."""
  fresh = make_args or (lambda: args)
  first = fresh()
  sources = hlo_sources(fn.lower(*first).compile().as_text())
  jax.block_until_ready(fn(*first))  # the warm-up call: compiles
  folder = tempfile.mkdtemp(prefix="profile_ops_")
  # made and finished before the trace: a decode step's fresh cache comes from a prefill, whose ops (same
  # fusion names, 16x the tokens) an asynchronous dispatch would otherwise run inside the trace
  calls = [jax.block_until_ready(fresh()) for _ in range(reps)]
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    start = time.perf_counter()
    for a in calls:
      jax.block_until_ready(fn(*a))
    wall_ms = (time.perf_counter() - start) * 1e3 / reps
  trace = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
  if not trace:
    raise SystemExit(f"profile_ops: jax.profiler wrote no trace under {folder}")
  events = json.load(gzip.open(trace[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  # A GPU's kernels run in the device's process and name their HLO op in args; the host's launches of
  # them would count the same op twice, so on a GPU only the device's events count.
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    name = (e.get("args") or {}).get("hlo_op") or e.get("name", "")
    if e.get("ph") == "X" and name in sources and (not devices or e.get("pid") in devices):
      total[name] += e.get("dur", 0)
      count[name] += 1
  rows = [dict(op=op, ms=round(us / reps / 1e3, 2), per_call=count[op] // reps, kind=kind_of(op, sources[op]),
               source="/".join(sources[op].split("/")[-2:])[:60]) for op, us in total.most_common()]
  return rows, wall_ms


def summarise(what: str, rows: list[dict], wall_ms: float, top: int) -> dict:
  ops_ms = sum(r["ms"] for r in rows)
  by_kind = {k: round(sum(r["ms"] for r in rows if r["kind"] == k), 1) for k in KINDS}
  print(f"\n## {what}: {wall_ms:.0f} ms a call (wall), {ops_ms:.0f} ms in XLA ops\n")
  print("| kind | ms | share of op time |\n|---|---|---|")
  for k, ms in by_kind.items():
    if ms:
      print(f"| {k} | {ms} | {ms / ops_ms:.0%} |")
  print(f"\ntop {top} ops:\n\n| op | ms | x per call | kind | HLO source |\n|---|---|---|---|---|")
  for r in rows[:top]:
    print(f"| {r['op']} | {r['ms']} | {r['per_call']} | {r['kind']} | {r['source']} |")
  return dict(what=what, wall_ms=round(wall_ms, 1), ops_ms=round(ops_ms, 1), by_kind=by_kind, top=rows[:top])


def random_ids(backbone, batch, length):
  return make_inputs(batch, length, 0, backbone.config.vocab_size, backbone.config.hidden_size)[0]


def forward_case(backbone, args):
  ids = jnp.asarray(random_ids(backbone, args.batch, args.seq))
  mask = jnp.ones(ids.shape, bool)
  fn = jax.jit(lambda model, ids, mask: model(ids, attention_mask=mask))
  return fn, (backbone.model, ids, mask), None


def train_step_case(backbone, args):
  ids = random_ids(backbone, args.batch, args.seq)
  step, trainable, opt_state, frozen = prompt_step(backbone, args.prompt_tokens)
  batch = batch_for(ids)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the step donates the prompts and optimizer state
  return step, None, lambda: (copy(trainable), copy(opt_state), frozen, batch)


def decode_step_case(backbone, args):
  """One iteration of the sampler's model: one token per row against the cache (donated, as in its loop)."""
  model, b = backbone.model, args.decode_batch
  ids = jnp.asarray(random_ids(backbone, b, 16))
  prefill = jax.jit(lambda model, ids, cache: model(ids, attention_mask=jnp.ones(ids.shape, bool), cache=cache))

  @functools.partial(jax.jit, donate_argnums=1)
  def step(model, cache, token):
    return model(token[:, None], attention_mask=jnp.ones((b, 1), bool), cache=cache)

  def fresh():
    logits, cache = prefill(model, ids, model.init_cache(b, max(args.cache, 17)))
    return model, cache, jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

  return step, None, fresh


def sampling_case(backbone, args):
  """The rest of a sampler iteration: top-p 0.95 and the draw, on the model's logits for --decode_batch rows."""
  model, b = backbone.model, args.decode_batch
  ids = jnp.asarray(random_ids(backbone, b, 16))
  logits = jax.jit(lambda model, ids: model(ids)[:, -1])(model, ids)
  fn = jax.jit(lambda logits, key: sampling.sample(key, sampling.apply_top_p(logits, 0.95)))
  return fn, (logits, jax.random.key(0)), None


CASES = {"forward": forward_case, "train_step": train_step_case, "decode_step": decode_step_case,
         "sampling": sampling_case}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--what", nargs="+", default=list(CASES), choices=list(CASES))
  parser.add_argument("--batch", type=int, default=8, help="forward / train_step rows")
  parser.add_argument("--seq", type=int, default=128, help="forward / train_step tokens per row")
  parser.add_argument("--prompt_tokens", type=int, default=20, help="train_step: soft-prompt length")
  parser.add_argument("--decode_batch", type=int, default=64)
  parser.add_argument("--cache", type=int, default=80, help="decode_step: cache slots (16 prompt + 64 new)")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (bf16: GPU/TPU)")
  add_backbone_argument(parser)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  machine = describe()
  print(machine, flush=True)
  dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
  backbone = msp_jax.load_backbone(args.backbone, dtype=dtype, with_tokenizer=False)
  result = {**machine, "cases": []}
  for what in args.what:
    fn, fn_args, fresh = CASES[what](backbone, args)
    rows, wall_ms = profile(fn, fn_args, args.reps, fresh)
    result["cases"].append(summarise(what, rows, wall_ms, args.top))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
