"""Numpy batches of `Segments`, in the shapes the trainer and the sampler consume.

Decoder-only (GPT-2, Llama/SmolLM2), left padded so generation continues from the right edge:
  input_ids      [B, T] int32  [pad ... pad][text tokens][target tokens][EOS]
  attention_mask [B, T] bool   False on padding
  loss_mask      [B, T] bool   True on target tokens and the EOS (all False without a target)
The model puts `embedded_prefix` [B, P, D] before the token embeddings and takes positions from the
attention mask, so the padding is invisible to it. Loss convention (logits[:, t] predict token t+1):
  loss = sum(CE(logits[:, :-1], input_ids[:, 1:]) * loss_mask[:, 1:]) / sum(loss_mask[:, 1:])
The text is never empty, so the first target token always has a scored predecessor.

Encoder-decoder (T5): the prefix goes before the encoder tokens; padding is on the right:
  input_ids [B, T] + attention_mask: text tokens + EOS
  decoder_input_ids [B, U] + decoder_attention_mask: decoder start (= pad, as T5) + target tokens
  labels [B, U]: target tokens + EOS; loss_mask [B, U] marks them (no shift needed:
  loss = sum(CE(logits, labels) * loss_mask) / sum(loss_mask)). No decoder arrays without a target.

Both layouts add:
  attribute_ids [B, S, M] int32 and attribute_mask [B, S, M] bool: the example's attribute ids per
    attribute set (S sets), padded with id 0 and mask False. M is bucketed like the lengths: the
    smallest of 1, 2, 4, 8, ..., max_mixture that holds the batch's largest set, so a batch of one-
    or two-attribute rows does not carry (and the concat mixer does not compute) max_mixture slots
  domain_id [B] int32;  example_mask [B] bool: False on rows that only fill up a final batch
Lengths T and U are the smallest bucket that fits the longest row, so a run compiles a few shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from msp_jax.data.layout import Segments
from msp_jax.data.sources import DataError


@dataclasses.dataclass(frozen=True)
class BatchConfig:
  buckets: tuple[int, ...] = (64, 128, 256, 512)  # token lengths a batch is padded to
  max_mixture: int = 10            # M; TOPv2 reminder has up to 9 slot types in one utterance
  truncate_attributes: bool = False  # keep the first M ids instead of failing
  truncate_text: bool = False        # drop prompt text from the left instead of failing on long rows
  encoder_decoder: bool = False      # T5 layout instead of decoder-only


def make_batch(segments: Sequence[Segments], tokenizer, config: BatchConfig = BatchConfig(),
               example_mask: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
  """The arrays of one batch; targets are used when every segment has one, else none are."""
  with_target = all(s.target is not None for s in segments)
  text_ids = _encode(tokenizer, [s.text for s in segments])
  target_ids = _encode(tokenizer, [s.target for s in segments]) if with_target else None
  batch = (_encoder_decoder if config.encoder_decoder else _decoder_only)(segments, text_ids, target_ids, tokenizer, config)
  batch.update(attribute_arrays(segments, config))
  batch["domain_id"] = np.asarray([s.domain_id for s in segments], np.int32)
  batch["example_mask"] = np.ones(len(segments), bool) if example_mask is None else np.asarray(example_mask, bool)
  return batch


def row_length(segments: Segments, tokenizer) -> int:
  """Tokens of one example's text + target + EOS: its row before padding (decoder-only), the sort key of
  length grouping (encoder-decoder: both sides together)."""
  text = len(_encode(tokenizer, [segments.text])[0])
  target = len(_encode(tokenizer, [segments.target])[0]) + 1 if segments.target is not None else 0
  return text + target


def padding_key(segments: Segments, tokenizer, config: BatchConfig, *, by_slots: bool) -> tuple[int, int]:
  """(attribute-axis bucket or 0, row length) of one row: rows cut into batches in this order pad alike.
  `by_slots` where every attribute slot costs prefix tokens (the concat mixer: `n_tokens` a slot);
  elsewhere slots cost next to nothing and tokens alone decide."""
  largest = max((len(ids) for ids in segments.attribute_ids), default=0)
  return mixture_bucket(largest, config) if by_slots else 0, row_length(segments, tokenizer)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
  # No special tokens: EOS is placed explicitly, and the text must tokenise the same in training
  # and in generation.
  return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pad_id(tokenizer) -> int:
  # SmolLM2 defines no pad token: pad with EOS. Padding is masked everywhere, so any id would do.
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def bucket(length: int, config: BatchConfig, uids: Sequence[str] = ()) -> int:
  for size in config.buckets:
    if length <= size:
      return size
  raise DataError(f"a row of {length} tokens (examples {', '.join(uids[:4])}) exceeds the largest bucket "
                  f"{config.buckets[-1]}; add a bucket or set truncate_text=True")


def mixture_bucket(size: int, config: BatchConfig) -> int:
  """The attribute axis M for a batch whose largest set has `size` ids: a power of two, at most max_mixture."""
  m = 1
  while m < size and m < config.max_mixture:
    m *= 2
  return min(m, config.max_mixture)


def _fit(segment: Segments, text: list[int], tail: int, config: BatchConfig) -> list[int]:
  """Text tokens cut from the left so that text + tail fits the largest bucket, if allowed."""
  room = config.buckets[-1] - tail
  if len(text) <= room:
    return text
  if not config.truncate_text or room <= 0:
    raise DataError(f"example {segment.uid}: {len(text) + tail} tokens exceed the largest bucket "
                    f"{config.buckets[-1]}; add a bucket or set truncate_text=True")
  return text[len(text) - room:]


def _decoder_only(segments, text_ids, target_ids, tokenizer, config) -> dict[str, np.ndarray]:
  eos = tokenizer.eos_token_id
  rows, scored = [], []
  for i, seg in enumerate(segments):
    tail = target_ids[i] + [eos] if target_ids is not None else []
    rows.append(_fit(seg, text_ids[i], len(tail), config) + tail)
    scored.append(len(tail))
  t = bucket(max(map(len, rows)), config, [s.uid for s in segments])
  input_ids = np.full((len(rows), t), pad_id(tokenizer), np.int32)
  attention_mask = np.zeros((len(rows), t), bool)
  loss_mask = np.zeros((len(rows), t), bool)
  for i, (row, n) in enumerate(zip(rows, scored)):
    input_ids[i, t - len(row):] = row
    attention_mask[i, t - len(row):] = True
    loss_mask[i, t - n:] = n > 0
  # Left padding puts every row's target at the end: the loss mask covers only that suffix window (its
  # width a bucket, for few shapes), and the model computes logits, the softmax and its gradient there
  # alone (17% of a prompt step on CPU is the LM head and its softmax; a row's target is often a fifth).
  window = min(bucket(max(scored), config), t)
  return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask[:, t - window:]}


def full_loss_mask(loss_mask, length: int):
  """A decoder-only loss mask [B, W] (the last W of `length` columns) as [B, length] (numpy in, numpy
  out; a traced array in, a traced array out)."""
  pad = ((0, 0), (length - loss_mask.shape[1], 0))
  return np.pad(loss_mask, pad) if isinstance(loss_mask, np.ndarray) else jnp.pad(loss_mask, pad)


def _encoder_decoder(segments, text_ids, target_ids, tokenizer, config) -> dict[str, np.ndarray]:
  eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
  uids = [s.uid for s in segments]
  encoder = [_fit(seg, ids, 1, config) + [eos] for seg, ids in zip(segments, text_ids)]
  batch = dict(zip(("input_ids", "attention_mask"), _right_padded(encoder, pad, bucket(max(map(len, encoder)), config, uids))))
  if target_ids is not None:
    labels = [ids + [eos] for ids in target_ids]
    u = bucket(max(map(len, labels)), config, uids)
    batch["decoder_input_ids"], batch["decoder_attention_mask"] = _right_padded([[pad] + ids[:-1] for ids in labels], pad, u)
    batch["labels"], batch["loss_mask"] = _right_padded(labels, pad, u)
  return batch


def _right_padded(rows: list[list[int]], pad: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  return ids, mask


def attribute_arrays(segments: Sequence[Segments], config: BatchConfig) -> dict[str, np.ndarray]:
  """attribute_ids / attribute_mask [B, S, M]; more than M ids in a set fails unless truncating."""
  s = len(segments[0].attribute_ids)
  m = mixture_bucket(max((len(ids) for seg in segments for ids in seg.attribute_ids), default=0), config)
  ids = np.zeros((len(segments), s, m), np.int32)
  mask = np.zeros((len(segments), s, m), bool)
  for b, seg in enumerate(segments):
    for j, set_ids in enumerate(seg.attribute_ids):
      if len(set_ids) > m and not config.truncate_attributes:
        raise DataError(f"example {seg.uid}: {len(set_ids)} attributes in attribute set {j} (ids {list(set_ids)}) "
                        f"exceed max_mixture={config.max_mixture}; raise max_mixture or set truncate_attributes=True")
      kept = set_ids[:m]
      ids[b, j, :len(kept)] = kept
      mask[b, j, :len(kept)] = True
  return {"attribute_ids": ids, "attribute_mask": mask}
