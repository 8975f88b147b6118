"""Pieces every backbone shares: parameters with partition metadata, norms, attention with a KV
cache, the embedded-prefix join, mask-derived positions, and the decoder-only calling convention.

Conventions (all model files):
  B batch, T new tokens this call, S cache slots (= T without a cache), D model width,
  H query heads, K key/value heads (GQA: H % K == 0), Dh head width, L layers.
  Per-layer weights are stacked on a leading L axis and applied with `jax.lax.scan`: one layer is
  traced and compiled once, which compiles 3-10x faster than a Python loop and runs as fast.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct


# Logical axis names; `msp_jax.sharding` maps them onto mesh axes.
LAYERS, EMBED, VOCAB, HEADS, KV_HEADS, HEAD_DIM, MLP = "layers", "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp"


def param(shape, axes, dtype, init=None):
  """An `nnx.Param` of `shape` carrying logical `axes` (one name or None per dim) for sharding.

  `init` is a `jax.random` key (normal, std 0.02), "ones" (norm scales) or None (zeros). Models
  are normally built abstractly (`nnx.eval_shape`) and filled from a checkpoint, so the initial
  value only matters for tiny random test models. Sharding is applied later, by the caller's mesh.
  """
  assert len(shape) == len(axes), (shape, axes)
  if init is None or isinstance(init, str):
    value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
  else:
    value = (0.02 * jax.random.normal(init, shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def rms_norm(x, weight, eps, *, offset=0.0):
  """RMSNorm with fp32 statistics, returned in x's dtype (Llama, T5; T5 passes no offset)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32.astype(x.dtype) * (weight + offset).astype(x.dtype))


def layer_norm(x, weight, bias, eps):
  """LayerNorm with fp32 statistics (GPT-2)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype)


@struct.dataclass
class KVCache:
  """Keys/values of every layer for incremental decoding.

  All rows write the same slot range each call (left padding keeps rows aligned), so one scalar
  `index` suffices; `valid` marks which slots hold real tokens and `length` counts them per row,
  which is where the next token's position comes from.
  """
  # The layouts the score and value dots read without a copy: keys [B, K, Dh, S], values [B, K, S, Dh] per
  # layer. In the tokens' [B, S, K, Dh] layout XLA:CPU transposed both per layer per decoding step (18% of
  # its op time); keys as [B, K, S, Dh] made the score dot 1.6x slower than keys as [B, K, Dh, S].
  k: jax.Array       # [L, B, K, Dh, S]
  v: jax.Array       # [L, B, K, S, Dh]
  valid: jax.Array   # [B, S] bool
  length: jax.Array  # [B] int32, real tokens so far per row
  index: jax.Array   # [] int32, next slot to write
  # static: no slot written yet, so a prefill attends over its own keys alone (not over S masked slots,
  # which XLA would also constant-fold for seconds at compile time)
  empty: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def create(cls, num_layers, batch, max_len, num_kv_heads, head_dim, dtype=jnp.float32):
    heads = (num_layers, batch, num_kv_heads)
    return cls(k=jnp.zeros((*heads, head_dim, max_len), dtype), v=jnp.zeros((*heads, max_len, head_dim), dtype),
               valid=jnp.zeros((batch, max_len), bool), length=jnp.zeros((batch,), jnp.int32),
               index=jnp.zeros((), jnp.int32), empty=True)

  @property
  def max_len(self):
    return self.v.shape[3]


def join_prefix(embeds, mask, embedded_prefix, prefix_mask=None):
  """Prepends a soft prompt [B, P, D] to token embeddings [B, T, D]; returns (x, mask, P).

  `prefix_mask` [B, P] (default: all ones) lets a prefix have padding slots (e.g. the concat mixer
  with fewer than M attributes). Left pads of the tokens sit between prefix and text in memory,
  but positions come from the mask, so the model sees exactly [prefix][text] (the layout bug
  PEFT #1093 reports cannot happen).
  """
  if embedded_prefix is None:
    return embeds, mask, 0
  b, p, _ = embedded_prefix.shape
  prefix_mask = jnp.ones((b, p), bool) if prefix_mask is None else prefix_mask.astype(bool)
  x = jnp.concatenate([embedded_prefix.astype(embeds.dtype), embeds], axis=1)
  return x, jnp.concatenate([prefix_mask, mask], axis=1), p


def positions_and_mask(mask, cache: KVCache | None):
  """Positions [B, T] of the new tokens and the attention mask [B, T, S] (causal and padding).

  Positions count real tokens only, so a left-padded row gets the positions it would get alone.
  Returns (positions, attn_mask, cache with valid/length/index advanced or None).
  """
  mask = mask.astype(bool)
  b, t = mask.shape
  start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
  positions = jnp.maximum(start[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
  if cache is None:
    key_valid, q_slot, k_slot = mask, jnp.arange(t), jnp.arange(t)
  else:
    key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
    q_slot, k_slot = cache.index + jnp.arange(t), jnp.arange(cache.max_len)
    cache = cache.replace(valid=key_valid, length=cache.length + mask.sum(1, dtype=jnp.int32),
                          index=cache.index + t, empty=False)
  attn_mask = key_valid[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])
  return positions, attn_mask, cache


def write_cache(cache: KVCache, k, v, index) -> KVCache:
  """Writes every layer's new keys/values [L, B, T, K, Dh] at slot `index` in one update.

  Layers return only their new keys/values (not whole per-layer caches) so the scan does not
  re-stack the full cache every call: -20% per decoding step at batch 64 on CPU.
  """
  k, v = _dot_layouts(k, v)
  k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, 0, 0, 0, index))
  v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, 0, 0, index, 0))
  return cache.replace(k=k, v=v)


def attention(q, k, v, mask, *, scale, bias=None):
  """Grouped-query dot-product attention; softmax in fp32.

  q [B, T, H, Dh]; k, v [B, S, K, Dh]; mask [B, T, S] bool; bias [B|1, H, T, S] (T5's
  relative positions) or None. Returns [B, T, H, Dh] in q's dtype.

  On a GPU in bf16/fp16 without a bias, cuDNN's fused (flash) attention: the einsum form materialises
  the [B, K, G, T, S] scores and transposes them, a third of a prompt-only train step on an H200
  (README, "GPU").
  """
  if bias is None and fused_attention_applies(q):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn")
  return einsum_attention(q, k, v, mask, scale=scale, bias=bias)


def einsum_attention(q, k, v, mask, *, scale, bias=None):
  """`attention` as einsums on every backend (its CPU form; the reference for the fused kernel's tests)."""
  return _attend(q, [(*_dot_layouts(k, v), mask, bias)], scale)


def _dot_layouts(k, v):
  """Keys, values [..., S, K, Dh] -> keys [..., K, Dh, S], values [..., K, S, Dh]: the dots' layouts, the
  `KVCache`'s (with or without its leading L axis)."""
  return jnp.moveaxis(k, -3, -1), jnp.swapaxes(v, -3, -2)


def fused_attention_applies(q) -> bool:
  """Whether `attention` takes cuDNN's fused kernel for q: a GPU, a 16-bit dtype, a head width it takes."""
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def cached_attention(q, k, v, k_cache, v_cache, index, mask, *, scale, bias=None, empty=False):
  """Attention over a KV cache's earlier slots plus this call's keys k, v [B, T, K, Dh], without writing
  the cache (the caller writes every layer's new keys once, `write_cache`).

  Equal to writing k, v at slot `index` of k_cache [B, K, Dh, S], v_cache [B, K, S, Dh] and calling `attention` with
  `mask` [B, T, S] (and `bias` [B|1, H, T, S]): the cache's slots before `index` and the new keys are the
  same keys under the same mask, in another order. A per-layer write would copy the layer's whole cache
  each call: 8-16% of a decoding step on CPU (batch 8-64). `empty` (static: the cache's `empty`): no
  earlier slot holds a key, so only the new keys are attended.
  """
  s, t = v_cache.shape[2], k.shape[1]
  new = jax.lax.dynamic_slice_in_dim(mask, index, t, axis=2)  # the columns of the slots this call's keys take
  new_bias = None if bias is None else jax.lax.dynamic_slice_in_dim(bias, index, t, axis=3)
  if empty:  # a prefill: plain attention over its own keys (cuDNN's fused kernel where it applies)
    return attention(q, k, v, new, scale=scale, bias=new_bias)
  earlier = mask & (jnp.arange(s) < index)[None, None, :]
  return _attend(q, [(k_cache, v_cache, earlier, bias), (*_dot_layouts(k, v), new, new_bias)], scale)


# The score and value einsums (benchmarks/profile_ops.py names attention's ops by them).
SCORES, VALUES = "bkgtd,bkds->bkgts", "bkgts,bksd->bkgtd"


def _attend(q, parts, scale):
  """Softmax attention of q [B, T, H, Dh] over the keys of every (k, v, mask, bias) part together; each
  part's k [B, K, Dh, S], v [B, K, S, Dh] (the KV cache's layout, which the score and value dots read
  without a copy)."""
  b, t, h, dh = q.shape
  kh = parts[0][0].shape[1]
  q = q.reshape(b, t, kh, h // kh, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
  logits = []
  for k, _, mask, bias in parts:
    part = jnp.einsum(SCORES, q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
      part = part + bias.astype(jnp.float32).reshape(bias.shape[0], kh, h // kh, t, -1)
    logits.append(jnp.where(mask[:, None, None], part, jnp.finfo(jnp.float32).min))
  probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
  out, start = 0, 0
  for _, v, _, _ in parts:
    size = v.shape[2]
    out = out + jnp.einsum(VALUES, probs[..., start:start + size].astype(v.dtype), v)
    start += size
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh).astype(q.dtype)


def values(module: nnx.Module, names):
  """The arrays of `module`'s params `names`, as a dict (scan needs plain arrays)."""
  return {n: getattr(module, n)[...] for n in names if getattr(module, n, None) is not None}


class DecoderLM(nnx.Module):
  """The calling convention of the decoder-only backbones (GPT-2, Llama family).

  `model(input_ids, attention_mask=None, *, embedded_prefix=None, prefix_mask=None, cache=None, columns=None)`
  returns logits [B, T, V] (fp32) for the token positions (not the prefix), or `(logits, cache)` when
  a `KVCache` is passed (see `init_cache`); `columns` (static slice of the T token positions) computes
  the logits of those positions only. Subclasses own `embed`, `lm_head` (None when tied),
  `dtype` and `hidden_states(x, mask, cache)`.
  """

  def embed_tokens(self, input_ids):
    return self.embed[...][input_ids].astype(self.dtype)

  def __call__(self, input_ids, attention_mask=None, *, embedded_prefix=None, prefix_mask=None, cache=None,
               columns=None):
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    x, mask, p = join_prefix(self.embed_tokens(input_ids), mask, embedded_prefix, prefix_mask)
    h, new_cache = self.hidden_states(x, mask, cache)
    h = h[:, p:] if columns is None else h[:, p:][:, columns]  # slice before the head: [B, T, V] logits are
    # the largest array of a train step, and slicing them afterwards copies it
    head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", h, head.astype(self.dtype), preferred_element_type=jnp.float32)
    return logits if cache is None else (logits, new_cache)
