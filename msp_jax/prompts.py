"""The trainable part of MSP: an instruction prompt, one soft prompt per attribute, and a mixer.

`SoftPrompts(...)(attribute_ids, attribute_mask, text)` gives the prefix the backbone sees:
[instruction (n_tokens)] + mix(attribute prompts of the example). Every trainable value is a
`PromptParam`, so training splits the model into trainable / frozen by type.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from msp_jax.mixers import MIXERS, PromptParam, make_mixer

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ATTRIBUTE_TOKENS = 20  # tokens per attribute prompt, as in the paper


def instruction_text(num_shot: int) -> str:
  """The default instruction: it asks for num_shot exemplars plus the one to generate."""
  n = num_shot + 1
  return f"Show me {NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} distinct utterances that all express the"


def embed_text(text: str, n_tokens: int, embed_table: np.ndarray, tokenizer) -> np.ndarray:
  """The token embeddings of `text`, repeated to fill exactly n_tokens rows: [n_tokens, D]."""
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if not ids:
    raise ValueError(f"cannot initialise a prompt from empty text {text!r}")
  return np.asarray(embed_table)[np.resize(np.asarray(ids), n_tokens)].astype(np.float32)


def init_instruction(how: str, n_tokens: int, embed_table, tokenizer=None, *, text: str = "", seed: int = 0):
  """Instruction prompt [n_tokens, D]: from `text`, from sampled vocabulary rows, or uniform(-0.5, 0.5)."""
  embed_table = np.asarray(embed_table)
  rng = np.random.default_rng(seed)
  if how == "text":
    return embed_text(text, n_tokens, embed_table, tokenizer)
  if how == "vocab":
    return embed_table[rng.integers(0, embed_table.shape[0], n_tokens)].astype(np.float32)
  if how == "uniform":
    return rng.uniform(-0.5, 0.5, (n_tokens, embed_table.shape[1])).astype(np.float32)
  raise ValueError(f"instruction init {how!r} is not supported; valid: text, vocab, uniform")


def init_bank(descriptions: Sequence[str], embed_table, tokenizer, n_tokens: int = ATTRIBUTE_TOKENS):
  """One prompt per attribute [K, n_tokens, D], each its description's embeddings repeated."""
  return np.stack([embed_text(d, n_tokens, embed_table, tokenizer) for d in descriptions])


PLAIN = "none"  # plain prompt tuning: the instruction prompt only, no attribute prompts (the paper's baseline)
MIXTURES = (*MIXERS, PLAIN)


class SoftPrompts(nnx.Module):
  """Instruction prompt + attribute banks (one per attribute set, e.g. intents and slots) + mixer.

  With mixer "none" there are no banks and no mixer: plain prompt tuning.
  """

  def __init__(self, instruction, banks: dict[str, np.ndarray], mixer: str, *, rngs: nnx.Rngs, **mixer_options):
    self.instruction = PromptParam(jnp.asarray(instruction, jnp.float32))  # [P, D]
    banks = {} if mixer == PLAIN else banks
    self.set_names = tuple(banks)  # the order of the S axis of attribute ids
    self.banks = nnx.Dict({name: PromptParam(jnp.asarray(bank, jnp.float32)) for name, bank in banks.items()})
    self.mixer_name = mixer
    self.mixer = None if mixer == PLAIN else make_mixer(mixer, self.instruction.shape[-1], rngs=rngs, **mixer_options)

  def __call__(self, attribute_ids, attribute_mask, text=None):
    """attribute_ids / mask [B, S, M] (S attribute sets), text [B, D] -> prefix [B, P+A, D], mask [B, P+A].

    Prompts stay fp32 here (the optimizer's copy); the backbone casts the prefix to its compute dtype.
    """
    b, s, m = attribute_ids.shape
    if self.mixer is None:
      return (jnp.broadcast_to(self.instruction[...], (b,) + self.instruction.shape),
              jnp.ones((b, self.instruction.shape[0]), bool))
    if s != len(self.set_names):
      raise ValueError(f"attribute ids have {s} sets, the prompts have {len(self.set_names)}: {self.set_names}")
    mask = attribute_mask.reshape(b, s * m).astype(bool)
    prompts = jnp.concatenate([self.banks[name][...][attribute_ids[:, i]] for i, name in enumerate(self.set_names)], 1)
    # Real attributes first (stable: sorted order within each set kept), padding slots last.
    order = jnp.argsort(~mask, axis=1, stable=True)
    prompts = jnp.take_along_axis(prompts, order[:, :, None, None], axis=1)
    mask = jnp.take_along_axis(mask, order, axis=1)
    mixed, mixed_mask = self.mixer(prompts, mask, text)
    instruction = jnp.broadcast_to(self.instruction[...], (b,) + self.instruction.shape)
    prefix = jnp.concatenate([instruction, mixed.astype(instruction.dtype)], 1)
    return prefix, jnp.concatenate([jnp.ones(instruction.shape[:2], bool), mixed_mask], 1)


def pooled_text(embeds, mask):
  """Max-pooled embeddings [B, D] of the text tokens (mask [B, T]); zeros for an empty row."""
  pooled = jnp.max(jnp.where(mask[..., None], embeds, -jnp.inf), axis=1)
  return jnp.where(mask.any(1)[:, None], pooled, 0).astype(jnp.float32)
