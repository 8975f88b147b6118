"""How the grid's prompt training regime changes what the prompts learn, measured on the dev split only.

  python benchmarks/prompt_regime.py [--task nlupp/hotels] [--method attention] [--lr 0.01 0.1 0.3]
      [--n_tokens 20] [--epochs 10] [--workdir /tmp/prompt_regime] [--json out.json]

Each (learning rate, instruction length) trains seed 0's prompts exactly as the grid's method config
does (`experiment.method_config`), except: `epochs` epochs over the seeds, warm-up 10% of the steps
then cosine decay (the original's schedule, ../shared/ORIGINAL.md §3.1), the dev loss after every
epoch on the whole dev split, and no early stop. Prints per run the dev loss at step 0 and per epoch, the best epoch, and how far the best
prompts moved from their initialisation (relative L2 per part: instruction prompt, attribute banks,
mixer). Dev loss is comparable across instruction lengths: it is the seed utterance's tokens only.
Runs resume (they are ordinary train.py workdirs), so an interrupted sweep continues where it stopped.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

import numpy as np
from flax import nnx

from benchmarks.machine import describe
from configs import experiment as experiment_config
from msp_jax import assembly, experiment, files, trainer, training
from msp_jax.models.weights import load_backbone


def leaves_by_part(model) -> dict[str, np.ndarray]:
  """The trainable prompt parameters flattened per part (instruction, banks, mixer)."""
  parts = {}
  for path, value in nnx.to_flat_state(nnx.state(model, training.PromptParam)):
    part = "instruction" if "instruction" in map(str, path) else "banks" if "banks" in map(str, path) else "mixer"
    parts.setdefault(part, []).append(np.asarray(value[...], np.float32).ravel())
  return {k: np.concatenate(v) for k, v in parts.items()}


def moved(before: dict, after: dict) -> dict:
  return {k: float(np.linalg.norm(after[k] - before[k]) / max(np.linalg.norm(before[k]), 1e-12)) for k in before}


def run_one(base, backbone, lr: float, n_tokens: int, epochs: int, workdir: str) -> dict:
  m = base.copy_and_resolve_references()
  m.update(learning_rate=lr, n_tokens=n_tokens, num_epochs=epochs, max_steps=0, warmup_fraction=0.1, decay="cosine",
           eval_every=0, eval_batches=0, patience=0, bleu_examples=0, workdir=os.path.join(workdir, f"lr{lr:g}_n{n_tokens}"))
  initial = leaves_by_part(assembly.build(m, backbone).model)
  summary = trainer.train(m, backbone)
  run = assembly.build(m, backbone)
  best_step = assembly.restore_prompts(run, "best")
  evals = [json.loads(line) for line in open(os.path.join(m.workdir, "metrics.jsonl")) if '"dev_loss"' in line]
  return {"lr": lr, "n_tokens": n_tokens, "epochs": epochs, "steps": summary["step"],
          "warmup_steps": trainer.warmup_steps(m, summary["step"]), "dev_loss": {int(e["step"]): e["dev_loss"] for e in evals},
          "best_step": best_step, "best_dev_loss": summary["best"], "moved": moved(initial, leaves_by_part(run.model)),
          "train_seconds": summary["seconds"]}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", default="nlupp/hotels")
  p.add_argument("--method", default="attention", help="concat | pooling | attention | bottleneck | cnn | prompt_tuning")
  p.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.1, 0.3])
  p.add_argument("--n_tokens", type=int, nargs="+", default=[20])
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--workdir", default="/tmp/prompt_regime")
  p.add_argument("--json", default="")
  a = p.parse_args()
  print(describe(), flush=True)
  c = experiment_config.get_config()
  dataset, _, domain = a.task.partition("/")
  base = experiment.method_config(c, dataset, domain, a.method, 0)
  backbone = load_backbone(c.model, dtype=c.dtype or None, param_dtype=c.param_dtype or None)
  results = []
  for n_tokens in a.n_tokens:
    for lr in a.lr:
      r = run_one(base, backbone, lr, n_tokens, a.epochs, a.workdir)
      results.append(r)
      curve = " ".join(f"{v:.3f}" for _, v in sorted(r["dev_loss"].items()))
      print(f"{a.task} {a.method} lr {lr:g} n_tokens {n_tokens}: dev loss by epoch {curve}; best step {r['best_step']} "
            f"({r['best_dev_loss']:.4f}); moved " + ", ".join(f"{k} {v:.3f}" for k, v in r["moved"].items())
            + f"; {r['train_seconds']:.0f} s", flush=True)
  if a.json:
    files.write_json_atomic(a.json, {"machine": describe(), "task": a.task, "method": a.method, "runs": results})


if __name__ == "__main__":
  main()
