"""Text embeddings from a frozen backbone: mean-pooled final hidden states over real tokens.

Used to score how far a generated utterance drifts from its seed (denoising). Batches are padded
to a few fixed lengths so a run compiles a handful of times.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LENGTH_BUCKETS = (32, 64, 128, 256)


@functools.partial(nnx.jit, static_argnames=("encoder_decoder",))
def _pooled(model, ids, mask, encoder_decoder: bool):
  if encoder_decoder:
    hidden, _ = model.encode(ids, mask)
  else:
    hidden, _ = model.hidden_states(model.embed_tokens(ids), mask)
  w = mask[..., None].astype(jnp.float32)
  return (hidden.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def text_embeddings(backbone, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
  """[N, D] float32 embeddings of `texts` (an empty text gives zeros)."""
  tok = backbone.tokenizer
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  out = None
  encoded = tok(list(texts), add_special_tokens=False)["input_ids"]
  order = np.argsort([len(e) for e in encoded])  # similar lengths together: fewer pads
  for start in range(0, len(texts), batch_size):
    rows = order[start:start + batch_size]
    longest = max(1, max(len(encoded[i]) for i in rows))
    length = next((b for b in LENGTH_BUCKETS if b >= longest), LENGTH_BUCKETS[-1])
    ids = np.full((batch_size, length), pad, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for j, i in enumerate(rows):
      e = encoded[i][-length:]
      ids[j, :len(e)], mask[j, :len(e)] = e, True
    pooled = np.asarray(_pooled(backbone.model, jnp.asarray(ids), jnp.asarray(mask), backbone.is_encoder_decoder))
    if out is None:
      out = np.zeros((len(texts), pooled.shape[-1]), np.float32)
    out[rows] = pooled[:len(rows)]
  return out if out is not None else np.zeros((0, 0), np.float32)
