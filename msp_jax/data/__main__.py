"""Inspect a task: split sizes, attribute inventory, one training example in the prompt layout.

  python -m msp_jax.data --dataset=crossner --domain=music --setting=full [--json]
  python -m msp_jax.data --dataset=files --data_path=examples/support_desk     # your own folder
  [--tokenizer=default|PATH.gguf|HF_FOLDER] shows the example as a batch row decoded back to text.
  --split=test --jsonl prints every example of a split instead, one JSON object a line, with its gold
  spans [{"type", "start", "end"}] in character offsets into its text.
Raw files come from $MSP_DATA_DIR (or --download); prepared data is kept in --data_dir.
"""
import argparse
import contextlib
import json
import sys

import numpy as np
import tensorflow_datasets as tfds

from msp_jax.data.batching import BatchConfig, full_loss_mask, make_batch
from msp_jax.data.layout import PromptLayout
from msp_jax.data.splits import DATASETS, SETTINGS, load_task
from msp_jax.errors import MspError


def summary(task, segments, decoded: str | None) -> dict:
  example = {"uid": segments.uid, "attributes": {s.name: [s.attributes[i].name for i in ids]
                                                 for s, ids in zip(task.ontology.sets, segments.attribute_ids)},
             "domain": task.ontology.domains[segments.domain_id], "text": segments.text, "target": segments.target}
  if decoded is not None:
    example["decoded"] = decoded
  return {"dataset": task.dataset, "domain": task.domain, "setting": task.setting, "seed": task.seed,
          "splits": {name: len(examples) for name, examples in task.splits.items()},
          "provenance": dict(task.provenance), "attributes": task.ontology.to_json()["sets"], "example": example}


def example_json(example) -> dict:
  return {"uid": example.uid, "domain": example.domain, "text": example.text,
          "attributes": {k: list(v) for k, v in example.attributes.items()}, "values": list(example.values),
          "spans": [dict(s) for s in example.spans]}


def decode_row(tokenizer, segments) -> str:
  """The example as the model gets it: soft prompt slots, then the batch tokens decoded."""
  batch = make_batch([segments], tokenizer, BatchConfig(buckets=(128, 256, 512, 1024, 2048)))
  ids = batch["input_ids"][0][batch["attention_mask"][0]]
  scored = full_loss_mask(batch["loss_mask"], batch["input_ids"].shape[1])[0][batch["attention_mask"][0]]
  return tokenizer.decode(ids[~scored]) + "«" + tokenizer.decode(ids[scored]) + "»"


def load_tokenizer(name: str):
  from msp_jax.models.tokenizer import load_gguf_tokenizer, load_hf_tokenizer
  from msp_jax.models.weights import default_gguf_path
  path = default_gguf_path() if name == "default" else name
  return load_gguf_tokenizer(path) if path.endswith(".gguf") else load_hf_tokenizer(path)


def main(argv=None):
  tfds.disable_progress_bar()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", required=True, choices=DATASETS)
  parser.add_argument("--domain", default="", help="the benchmark's domain (not used with --dataset=files)")
  parser.add_argument("--data_path", default=None, help="--dataset=files: your folder (train.jsonl, ...)")
  parser.add_argument("--setting", default="full", choices=SETTINGS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--download", action="store_true", help="fetch raw files from their public URLs")
  parser.add_argument("--tokenizer", default=None, help="also decode the example as a batch row")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--split", default="train", choices=("train", "dev", "test"), help="the split --jsonl prints")
  parser.add_argument("--jsonl", action="store_true", help="print the split's examples, one JSON object a line")
  args = parser.parse_args(argv)
  try:
    with contextlib.redirect_stdout(sys.stderr):  # TFDS announces a first prepare on stdout: keep --json(l) pure
      task = load_task(args.dataset, args.domain, args.setting, seed=args.seed, data_dir=args.data_dir,
                       download=args.download, data_path=args.data_path)
    if args.jsonl:
      for example in task.splits[args.split]:
        print(json.dumps(example_json(example), ensure_ascii=False))
      return
    layout = PromptLayout(task.ontology, task.splits["train"])
    segments = layout.segments(task.splits["train"][0], np.random.default_rng(args.seed))
    decoded = decode_row(load_tokenizer(args.tokenizer), segments) if args.tokenizer else None
  except MspError as e:
    sys.exit(f"error: {e}")
  info = summary(task, segments, decoded)
  if args.json:
    print(json.dumps(info, ensure_ascii=False))
    return
  print(f"{task.dataset} / {task.domain} / {task.setting} (seed {task.seed})")
  for name, count in info["splits"].items():
    print(f"  {name:5s} {count:6d}  {task.provenance[name]}")
  for attribute_set in task.ontology.sets:
    print(f"{attribute_set.name} ({len(attribute_set)}):")
    for a in attribute_set.attributes:
      print(f"  {a.name:32s} {'general ' if a.general else 'specific'}  {a.description}")
  example = info["example"]
  print(f"example {example['uid']}: " + "; ".join(f"{k}={', '.join(v) or '-'}" for k, v in example["attributes"].items()))
  slots = " ".join(f"[{k}: {len(v)}]" for k, v in example["attributes"].items())
  print(f"---\n[instruction prompt]{slots}{segments.text}«{segments.target}»<eos>\n---")
  if decoded is not None:
    print(f"decoded batch row (target in «»):\n{decoded}\n---")


if __name__ == "__main__":
  main()
