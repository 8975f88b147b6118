"""Features from a frozen backbone: mean-pooled sentence embeddings and per-word features.

Sentence embeddings score how far a generated utterance drifts from its seed (denoising) and feed
the downstream intent classifiers; per-word features feed the downstream BIO tagger. Batches are
padded to a few fixed lengths so a run compiles a handful of times.
"""
from __future__ import annotations

import functools
import warnings
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from msp_jax.data.batching import pad_id
from msp_jax.data.spans import word_spans
from msp_jax.errors import BackboneError
from msp_jax.losses import token_nll

LENGTH_BUCKETS = (32, 64, 128, 256)
# A call with at least this many batches shows a progress bar: the grid's domain-adaptation rows embed
# thousands of CoNLL sentences (minutes on a CPU) before their first line of output.
PROGRESS_MIN_BATCHES = 20


def _final_hidden(model, ids, mask, encoder_decoder: bool):
  if encoder_decoder:
    hidden, _ = model.encode(ids, mask)
  else:
    hidden, _ = model.hidden_states(model.embed_tokens(ids), mask)
  return hidden.astype(jnp.float32)  # [B, T, D]


@functools.partial(nnx.jit, static_argnames=("encoder_decoder",))
def _pooled(model, ids, mask, encoder_decoder: bool):
  w = mask[..., None].astype(jnp.float32)
  return (_final_hidden(model, ids, mask, encoder_decoder) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


_hidden = nnx.jit(_final_hidden, static_argnames=("encoder_decoder",))


def _padded_batches(backbone, encoded: Sequence[Sequence[int]], batch_size: int,
                    keep: str, desc: str) -> Iterator[tuple[np.ndarray, jax.Array, jax.Array]]:
  """(rows, ids [batch_size, L], mask [batch_size, L]) with L a bucket length, right-padded.

  Rows of similar length go together (fewer pads). A sequence longer than the last bucket keeps its
  last tokens (keep="end", what sentence embeddings have always done) or its first (keep="start",
  so token indices stay those of the whole text). `desc` names the progress bar of a long call.
  """
  pad = pad_id(backbone.tokenizer)
  order = np.argsort([len(e) for e in encoded], kind="stable")
  starts = range(0, len(encoded), batch_size)
  for start in tqdm(starts, desc=f"{desc} ({len(encoded)} texts)", unit="batch",
                    disable=len(starts) < PROGRESS_MIN_BATCHES):
    rows = order[start:start + batch_size]
    longest = max(1, max(len(encoded[i]) for i in rows))
    length = next((b for b in LENGTH_BUCKETS if b >= longest), LENGTH_BUCKETS[-1])
    ids = np.full((batch_size, length), pad, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for j, i in enumerate(rows):
      e = encoded[i][-length:] if keep == "end" else encoded[i][:length]
      ids[j, :len(e)], mask[j, :len(e)] = e, True
    yield rows, jnp.asarray(ids), jnp.asarray(mask)


def text_embeddings(backbone, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
  """[N, D] float32 embeddings of `texts` (an empty text gives zeros)."""
  out = None
  encoded = backbone.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
  for rows, ids, mask in _padded_batches(backbone, encoded, batch_size, keep="end", desc="sentence embeddings"):
    pooled = np.asarray(_pooled(backbone.model, ids, mask, backbone.is_encoder_decoder))
    if out is None:
      out = np.zeros((len(texts), pooled.shape[-1]), np.float32)
    out[rows] = pooled[:len(rows)]
  return out if out is not None else np.zeros((0, 0), np.float32)


def _first_tokens(words: list[tuple[int, int]], offsets: Sequence[tuple[int, int]]) -> np.ndarray:
  """Index of the first token overlapping each word's characters, -1 if none.

  Overlap rather than equal starts: byte-level BPE offsets include the leading space (" world").
  """
  offs = np.asarray(offsets, np.int64).reshape(-1, 2)
  first = np.full(len(words), -1, np.int64)
  for w, (ws, we) in enumerate(words):
    hit = np.nonzero((offs[:, 1] > ws) & (offs[:, 0] < we))[0]
    if len(hit):
      first[w] = hit[0]
  return first


def token_features(backbone, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
  """Per text, a [num_words, D] float32 array: the final hidden state at each word's first token.

  Words are whitespace-separated (see `word_spans`); the whole text is tokenized once and tokens
  are mapped to words by character offsets, so each word is tokenized as it is in context. A
  decoder-only backbone's state at the first sub-token sees only the words before it and that
  token. Texts longer than the last bucket (LENGTH_BUCKETS[-1] tokens) keep their first tokens;
  words starting beyond that get zero features and are counted in a warning.
  """
  tok = backbone.tokenizer
  if not getattr(tok, "is_fast", False):
    raise BackboneError(f"{backbone.source}: token_features needs a fast tokenizer (character offsets); "
                        f"got {type(tok).__name__}")
  texts = list(texts)
  enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
  first = [_first_tokens(word_spans(t), o) for t, o in zip(texts, enc["offset_mapping"])]
  out: list[np.ndarray | None] = [None] * len(texts)
  truncated = 0
  for rows, ids, mask in _padded_batches(backbone, enc["input_ids"], batch_size, keep="start", desc="word features"):
    hidden = np.asarray(_hidden(backbone.model, ids, mask, backbone.is_encoder_decoder))  # [B, L, D]
    for j, i in enumerate(rows):
      idx = first[i]
      ok = (idx >= 0) & (idx < hidden.shape[1])
      f = np.zeros((len(idx), hidden.shape[-1]), np.float32)
      f[ok] = hidden[j, idx[ok]]
      out[i] = f
      truncated += int((~ok).sum())
  if truncated:
    warnings.warn(f"token_features: {truncated} words without a token among the first {LENGTH_BUCKETS[-1]} "
                  "got zero features", stacklevel=2)
  return out


@nnx.jit
def _sequence_nll(model, ids, mask):
  logits = model(ids, attention_mask=mask, columns=slice(None, -1))  # [B, T-1, V]; logits[:, t] predicts token t+1
  nll = token_nll(logits, ids[:, 1:])
  scored = mask[:, 1:] & mask[:, :-1]
  return jnp.where(scored, nll, 0.0).sum(1), scored.sum(1)


def text_nll(backbone, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Per text: summed NLL of its tokens after the first under a decoder-only backbone, and how many
  tokens were scored ([N] float64, [N] int). Corpus perplexity: `text_quality.perplexity_from_nll`."""
  if backbone.is_encoder_decoder:
    raise BackboneError("text_nll needs a decoder-only language model (perplexity is scored left to right)")
  sums, counts = np.zeros(len(texts)), np.zeros(len(texts), np.int64)
  encoded = backbone.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
  for rows, ids, mask in _padded_batches(backbone, encoded, batch_size, keep="start", desc="perplexity"):
    s, n = _sequence_nll(backbone.model, ids, mask)
    sums[rows], counts[rows] = np.asarray(s)[:len(rows)], np.asarray(n)[:len(rows)]
  return sums, counts
