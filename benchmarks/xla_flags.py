"""XLA:CPU options vs transformers on the forward, one process per option, ours and torch interleaved:

  python benchmarks/xla_flags.py [--reps 5] [-- "" "--xla_cpu_use_xnnpack=false" ...]

Each option runs in a fresh process (XLA_FLAGS is read once, at start-up): batch 8 x 128 random tokens,
two warm-ups each, then `reps` pairs (ours, then transformers) timed back to back; prints the median
of the per-pair time ratios, which cancels most of the machine's drift. The default options are the
ones our jaxlib offers for dots on CPU.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

DEFAULT_FLAGS = ["", "--xla_cpu_use_xnnpack=false", "--xla_cpu_experimental_ynn_fusion_type=dot",
                 "--xla_cpu_experimental_ynn_fusion_type=individual_dot", "--xla_cpu_experimental_xnn_fusion_type=dot",
                 "--xla_cpu_experimental_xnn_fusion_type=individual_dot", "--xla_cpu_use_onednn=true"]


def one_option(reps: int) -> dict:
  """Runs in the child: ours and transformers on the same batch, interleaved."""
  import jax
  import numpy as np
  import torch
  import transformers

  import msp_jax
  from msp_jax.models import weights
  backbone = msp_jax.load_backbone(weights.DEFAULT_BACKBONE, with_tokenizer=False)
  ids = np.random.default_rng(0).integers(3, backbone.config.vocab_size, size=(8, 128))
  forward = jax.jit(lambda m, i: m(i))
  folder, name = os.path.split(weights.default_gguf_path())
  reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
  ours_ids, torch_ids = jax.numpy.asarray(ids), torch.tensor(ids)

  def ours():
    start = time.perf_counter()
    forward(backbone.model, ours_ids).block_until_ready()
    return time.perf_counter() - start

  def theirs():
    with torch.inference_mode():
      start = time.perf_counter()
      reference(torch_ids)
      return time.perf_counter() - start

  for _ in range(2):
    ours(), theirs()
  pairs = [(ours(), theirs()) for _ in range(reps)]
  ratios = [a / b for a, b in pairs]
  return {"flags": os.environ.get("XLA_FLAGS", ""), "ours_s": round(statistics.median(a for a, _ in pairs), 3),
          "torch_s": round(statistics.median(b for _, b in pairs), 3), "ratio": round(statistics.median(ratios), 3),
          "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("flags", nargs="*", default=DEFAULT_FLAGS, help='XLA_FLAGS values to compare, after "--" ("" = none)')
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(one_option(args.reps)), flush=True)
    return
  from benchmarks.machine import describe
  machine = describe()
  print(f"machine: {machine['cpu']} ({machine['cpu_kind']}, {machine['cores']} cores)", flush=True)
  for flags in args.flags:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--reps", str(args.reps)],
                          env=dict(os.environ, XLA_FLAGS=flags), capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    print(lines[-1] if proc.returncode == 0 and lines else
          json.dumps({"flags": flags, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}), flush=True)


if __name__ == "__main__":
  main()
