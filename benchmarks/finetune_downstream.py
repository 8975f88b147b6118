"""Wall time of one `downstream="finetune"` run (the original's protocol, label_generator.py) on the real
backbone: NLU++ few-shot seeds, dev-scored every epoch; per epoch the training seconds and the dev
decode seconds (epoch 1 includes compilation). Sizes the grid; not a grid.

  python benchmarks/finetune_downstream.py --params prompt --epochs 2 [--task nlupp/hotels] [--max_dev 100] \
      [--group_by_length 0] [--decode_reps 2]

--decode_reps N: after the fit, decode the dev split N more times with the batch shrinking as rows end
(label_generator.SHRINK_EVERY) and N times without, interleaved; their median seconds, and whether the
strings are the same.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

from configs import experiment as experiment_config
from msp_jax import experiment, label_generator, task_models
from msp_jax.data import load_task
from msp_jax.models.weights import load_backbone
from benchmarks.machine import describe


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", default="prompt", choices=["prompt", "full"])
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--lr", type=float, default=None, help="default: the config's (prompt) or 3e-5 (full)")
  parser.add_argument("--task", default="nlupp/hotels")
  parser.add_argument("--max_dev", type=int, default=100)
  parser.add_argument("--group_by_length", type=int, choices=[0, 1], default=1, help="0: random training batches")
  parser.add_argument("--decode_reps", type=int, default=0, help="dev decodes with and without shrinking, each")
  parser.add_argument("--json")
  args = parser.parse_args()
  c = experiment_config.get_config()
  c.update(downstream="finetune", finetune_params=args.params, finetune_epochs=args.epochs,
           finetune_lr=args.lr or (c.finetune_lr if args.params == "prompt" else 3e-5),
           finetune_group_by_length=bool(args.group_by_length))
  dataset, domain = args.task.split("/")
  result = {**describe(), "task": args.task, "params": args.params, "epochs": args.epochs, "lr": c.finetune_lr,
            "batch_size": c.finetune_batch_size, "max_new_tokens": c.finetune_max_new_tokens,
            "group_by_length": c.finetune_group_by_length}
  start = time.perf_counter()
  backbone = load_backbone(c.model)
  result["load_seconds"] = round(time.perf_counter() - start, 1)
  task = load_task(dataset, domain, "few_shot", seed=c.seed)
  records = [experiment.example_record(ex) for ex in task.splits["train"]]
  dev = list(task.splits["dev"])[:args.max_dev]
  model = task_models.FINETUNE_MODELS[dataset](task, task_models.FeatureCache(backbone), c, 0)
  start = time.perf_counter()
  model.fit(records, dev)
  result.update(train_examples=len(records), dev_examples=len(dev), fit_seconds=round(time.perf_counter() - start, 1),
                selection=model.selection)
  if args.decode_reps:
    result["decode"] = compare_shrinking(model.generator, [ex.text for ex in dev], args.decode_reps)
  print(json.dumps(result, indent=1), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


def compare_shrinking(generator, texts, reps: int) -> dict:
  """Median seconds of decoding `texts` with and without the shrinking batch, interleaved."""
  every, seconds, strings = label_generator.SHRINK_EVERY, {"shrink": [], "plain": []}, {}
  try:
    for _ in range(reps):
      for name, value in (("shrink", every), ("plain", 0)):
        label_generator.SHRINK_EVERY = value
        start = time.perf_counter()
        strings[name] = generator.generate(texts)
        seconds[name].append(round(time.perf_counter() - start, 2))
  finally:
    label_generator.SHRINK_EVERY = every
  median = {name: statistics.median(s) for name, s in seconds.items()}
  return {"seconds": seconds, "median_seconds": median, "plain_over_shrink": round(median["plain"] / median["shrink"], 2),
          "same_strings": strings["shrink"] == strings["plain"], "new_tokens_cap": generator.new_tokens}


if __name__ == "__main__":
  main()
