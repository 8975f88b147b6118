"""A Hugging Face folder with a backbone's architecture and random weights, for speed benchmarks where its
real weights cannot travel (the default GGUF is 98 MB; a lent GPU machine takes 64 MiB of files).

  python benchmarks/random_checkpoint.py OUT --config_only   # here: OUT/config.json, read from the default GGUF
  python benchmarks/random_checkpoint.py OUT                 # there: + OUT/model.safetensors (transformers, torch)
  python benchmarks/forward.py --backbone OUT ...            # every benchmark takes --backbone

Speed does not depend on the weights' values: the same shapes run the same kernels. Quality numbers do;
never score text from such a folder.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

from msp_jax.models import weights


def write_config(out: str, like: str) -> dict:
  path = weights.resolve(like)
  if path.endswith(".gguf"):
    config, _ = weights.gguf_config(weights.open_gguf(path), path)
  else:
    config = weights.read_hf_folder(path)[0]
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
  return config


def write_weights(out: str, seed: int) -> None:
  import torch
  import transformers
  torch.manual_seed(seed)
  config = transformers.AutoConfig.from_pretrained(out)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
  model.save_pretrained(out, safe_serialization=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", help="the folder to write (config.json, model.safetensors)")
  parser.add_argument("--like", default=weights.DEFAULT_BACKBONE, help="the backbone whose config is copied")
  parser.add_argument("--config_only", action="store_true", help="write config.json only (no torch needed)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.out, "config.json")):
    print("config:", write_config(args.out, args.like), flush=True)
  if not args.config_only:
    write_weights(args.out, args.seed)
  print("wrote", sorted(os.listdir(args.out)))


if __name__ == "__main__":
  main()
