"""Train-step time on a real task's batches: the attribute axis bucketed (as training pads it) vs
padded to max_mixture (as every batch was before bucketing), and the padding share of each step.

  python benchmarks/task_step.py [--mixture concat] [--dataset nlupp] [--domain hotels] [--steps 8]
      [--batch 8] [--json out.json]
  python benchmarks/task_step.py --epoch [--config configs/experiment.py] ...   # one epoch, rows grouped by length or not

With --epoch: one epoch of the config's batches (buckets and all) in random order, grouped by row length
and, for concat, grouped by attribute slots then length (data/iterator.py), each shape compiled before
timing: padding share, prefix + T per row, distinct shapes (compiles) and epoch seconds each way.

The same batches, in the same order, go through the same jitted prompt-only step twice; the only
difference is the width M of attribute_ids / attribute_mask. Masked slots cannot change the loss
(tests/test_training_step.py checks equal losses and gradients), so the time is all that differs.
Prints one line per step: sequence bucket T, mixture width M, padding shares, seconds each way.
"""
import argparse
import importlib.util
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
from msp_jax import data as msp_data
from msp_jax import assembly, mixers, sharding, trainer, training


def widened(batch: dict, m: int) -> dict:
  """The batch with its attribute arrays padded (id 0, mask False) to M = m."""
  pad = m - batch["attribute_ids"].shape[-1]
  return dict(batch, **{k: np.pad(batch[k], ((0, 0), (0, 0), (0, pad))) for k in ("attribute_ids", "attribute_mask")})


def timed(step, state, frozen, batch, mesh):
  start = time.perf_counter()
  state["t"], state["o"], metrics = step(state["t"], state["o"], frozen, trainer.model_batch(batch, mesh))
  return float(metrics["loss"]), time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mixture", default="concat")
  parser.add_argument("--dataset", default="nlupp")
  parser.add_argument("--domain", default="hotels")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--json")
  parser.add_argument("--epoch", action="store_true", help="time an epoch with and without length grouping")
  parser.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "common.py"), help="a config file: buckets, prompt lengths, ...")
  args = parser.parse_args()
  machine = describe()
  print(machine, flush=True)
  spec = importlib.util.spec_from_file_location("benchmark_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.mixture, c.dataset, c.domain, c.batch_size = args.mixture, args.dataset, args.domain, args.batch
  if args.epoch:
    return epoch_with_and_without_grouping(c, args, machine)
  run = assembly.build(c)
  mesh = sharding.make_mesh()
  graphdef, trainable, frozen = training.split(run.model)
  tx, _ = trainer.make_tx(c, 1000)
  step = training.make_train_step(graphdef, tx, mesh, trainable, tx.init(trainable), frozen)
  batches = msp_data.task_batches(run.task, "train", run.backbone.tokenizer, global_batch_size=c.batch_size,
                                  config=run.batch_config, seed=c.seed, num_epochs=None, num_exemplars=c.num_shot)
  batches = [next(batches) for _ in range(args.steps)]
  ways = {"bucketed": lambda b: b, "max_mixture": lambda b: widened(b, c.max_mixture)}
  fresh = lambda: {"t": jax.tree.map(jnp.copy, trainable), "o": tx.init(trainable)}  # the step donates its state
  states = {way: fresh() for way in ways}
  for shape in ways.values():  # run every shape once first: the table times steps, not compiles
    for b in {(b["input_ids"].shape, b["attribute_ids"].shape): b for b in batches}.values():
      timed(step, fresh(), frozen, shape(b), mesh)
  rows = []
  print("| step | T | M | padding: tokens | padding: attribute slots | bucketed s | max_mixture s | loss equal |")
  print("|---|---|---|---|---|---|---|---|")
  for i, batch in enumerate(batches):
    row = {"T": batch["input_ids"].shape[1], "M": batch["attribute_ids"].shape[-1], **trainer.padding_shares(batch),
           "pad_attribute_slots_at_max_mixture": trainer.padding_shares(widened(batch, c.max_mixture))["pad_attribute_slots"]}
    (loss_a, row["bucketed_s"]), (loss_b, row["max_mixture_s"]) = (
        timed(step, states[way], frozen, shape(batch), mesh) for way, shape in ways.items())
    row["loss_equal"] = bool(np.isclose(loss_a, loss_b, rtol=1e-5))
    rows.append(row)
    print(f"| {i + 1} | {row['T']} | {row['M']} | {row['pad_tokens']:.2f} | {row['pad_attribute_slots']:.2f} "
          f"(at M={c.max_mixture}: {row['pad_attribute_slots_at_max_mixture']:.2f}) | {row['bucketed_s']:.2f} | "
          f"{row['max_mixture_s']:.2f} | {row['loss_equal']} |", flush=True)
  result = {**machine, "mixture": args.mixture, "task": f"{args.dataset}/{args.domain}", "batch": args.batch,
            "bucketed_median_s": round(statistics.median(r["bucketed_s"] for r in rows), 3),
            "max_mixture_median_s": round(statistics.median(r["max_mixture_s"] for r in rows), 3), "steps": rows}
  result["bucketed_over_max_mixture"] = round(result["bucketed_median_s"] / result["max_mixture_median_s"], 3)
  print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


def epoch_with_and_without_grouping(c, args, machine):
  run = assembly.build(c)
  mesh = sharding.make_mesh()
  graphdef, trainable, frozen = training.split(run.model)
  tx, _ = trainer.make_tx(c, 1000)
  step = training.make_train_step(graphdef, tx, mesh, trainable, tx.init(trainable), frozen)
  fresh = lambda: {"t": jax.tree.map(jnp.copy, trainable), "o": tx.init(trainable)}
  def width(b):  # prefix + T of a batch's rows: instruction, mixed attribute prompts (concat: one a slot), text
    slots = b["attribute_ids"].shape[-1] if mixers.widens_prefix(c.mixture) else 1
    return c.n_tokens + (0 if c.mixture == "none" else c.attribute_tokens * slots) + b["input_ids"].shape[1]

  result = {**machine, "mixture": c.mixture, "task": f"{c.dataset}/{c.domain}", "batch": c.batch_size,
            "buckets": list(c.buckets)}
  ways = {"random": (False, False), "grouped": (True, False)}
  if mixers.widens_prefix(c.mixture):  # concat: also grouped by attribute slots first (group_by_slots)
    ways["grouped_by_slots"] = (True, True)
  for way, (grouped, by_slots) in ways.items():
    batches = list(msp_data.task_batches(run.task, "train", run.backbone.tokenizer, global_batch_size=c.batch_size,
                                         config=run.batch_config, seed=c.seed, num_exemplars=c.num_shot,
                                         group_by_length=grouped, group_by_slots=by_slots))
    shapes = {(b["input_ids"].shape, b["attribute_ids"].shape): b for b in batches}
    compile_s = sum(timed(step, fresh(), frozen, b, mesh)[1] for b in shapes.values())  # first call: compile + step
    state = fresh()
    seconds = sum(timed(step, state, frozen, b, mesh)[1] for b in batches)
    mask = np.concatenate([b["attention_mask"].ravel() for b in batches])
    result[way] = {"steps": len(batches), "shapes": len(shapes), "pad_tokens": round(float(1 - mask.mean()), 3),
                   "prefix_plus_T": round(float(np.mean([width(b) for b in batches])), 1),
                   "epoch_s": round(seconds, 2), "first_calls_s": round(compile_s, 1)}
    print(f"{way}: {result[way]}", flush=True)
  result["grouped_over_random_epoch"] = round(result["grouped"]["epoch_s"] / result["random"]["epoch_s"], 3)
  if "grouped_by_slots" in result:
    result["by_slots_over_grouped_epoch"] = round(result["grouped_by_slots"]["epoch_s"] / result["grouped"]["epoch_s"], 3)
  print(json.dumps({k: v for k, v in result.items() if k not in machine}, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
