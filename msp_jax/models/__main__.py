"""Greedy continuation with a backbone, to see one work:

  python -m msp_jax.models --prompt "The capital of France is" [--model smollm2-135m-instruct]
"""
import argparse
import sys
import time

import jax.numpy as jnp
import numpy as np

from msp_jax import sampling
from msp_jax.data.batching import pad_id
from msp_jax.errors import MspError
from msp_jax.models.weights import DEFAULT_BACKBONE, load_backbone


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=DEFAULT_BACKBONE, help="name, .gguf file, HF folder or hub id")
  parser.add_argument("--prompt", action="append", help="repeat for a batch (default: a demo prompt)")
  parser.add_argument("--max_new_tokens", type=int, default=32)
  args = parser.parse_args(argv)
  prompts = args.prompt or ["Show me three distinct utterances that all express the intent 'book a room':\n1)"]
  try:
    start = time.perf_counter()
    backbone = load_backbone(args.model)
  except MspError as e:
    sys.exit(f"error: {e}")
  tok = backbone.tokenizer
  if backbone.is_encoder_decoder or tok is None:
    sys.exit(f"error: {args.model}: greedy continuation needs a decoder-only model with a tokenizer")
  print(f"loaded {backbone.source} ({backbone.model_type}) in {time.perf_counter() - start:.1f}s")
  batch = tok(prompts, return_tensors="np", padding=True, padding_side="left")
  start = time.perf_counter()
  new = sampling.greedy(backbone.model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                        max_new_tokens=args.max_new_tokens, eos_id=tok.eos_token_id, pad_id=pad_id(tok))
  new = np.asarray(new)
  print(f"generated {new.shape[0]} x {args.max_new_tokens} tokens in {time.perf_counter() - start:.1f}s "
        "(including compilation)")
  for prompt, ids in zip(prompts, new.tolist()):
    print(f"--- {prompt!r}\n{prompt}{tok.decode(ids, skip_special_tokens=True)}")


if __name__ == "__main__":
  main()
