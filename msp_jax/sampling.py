"""The jitted decoding loop: prefill [prefix + prompt] once, then one token per iteration against
the KV cache inside a single `jax.lax.while_loop`, with a per-row done mask."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(nnx.jit, static_argnames=("max_new_tokens",))
def greedy(model, input_ids, attention_mask, *, max_new_tokens: int, eos_id: int | jax.Array = -1,
           pad_id: int | jax.Array = 0, embedded_prefix=None, prefix_mask=None):
  """Greedy continuation of a left-padded decoder-only batch.

  The model is an argument (its weights are jit inputs, never baked-in constants). Returns new
  tokens [B, max_new_tokens]; after a row emits `eos_id` it emits only `pad_id`.
  """
  b, t = input_ids.shape
  p = 0 if embedded_prefix is None else embedded_prefix.shape[1]
  cache = model.init_cache(b, p + t + max_new_tokens)
  logits, cache = model(input_ids, attention_mask=attention_mask, embedded_prefix=embedded_prefix,
                        prefix_mask=prefix_mask, cache=cache)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

  def cond(state):
    i, _, _, done, _ = state
    return (i < max_new_tokens) & ~done.all()

  def body(state):
    i, last_logits, cache, done, out = state
    token = jnp.where(done, pad_id, jnp.argmax(last_logits, -1).astype(jnp.int32))
    out = out.at[:, i].set(token)
    logits, cache = model(token[:, None], attention_mask=~done[:, None], cache=cache)  # pads after EOS: masked
    return i + 1, logits[:, -1], cache, done | (token == eos_id), out

  state = (jnp.zeros((), jnp.int32), logits[:, -1], cache, jnp.zeros((b,), bool), out)
  return jax.lax.while_loop(cond, body, state)[-1]
