"""T5 family: T5 v1.0, T5 v1.1 / Flan-T5, GODEL v1.1 (T5 architecture).

Encoder-decoder, pre-norm: RMSNorm (no mean, no bias) -> attention -> residual, then the same for
cross-attention (decoder) and the feed-forward block. T5 differs from the decoder-only families in:
- no 1/sqrt(Dh) scaling of attention logits (it is folded into the initialisation);
- positions enter only as a learned bias per (relative-position bucket, head), added to the
  self-attention logits. Only block 0 of each stack owns the table, and every layer of that stack
  uses it (bidirectional buckets in the encoder, causal in the decoder); cross-attention has none;
- v1.0: ReLU feed-forward, head tied to the input embedding and fed hidden states scaled by
  d_model**-0.5; v1.1 / Flan-T5: gated GELU (tanh approximation, HF's "gelu_new"), untied head,
  no scaling.
The embedded prefix (soft prompt) goes before the encoder input only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msp_jax.models import layers as L
from msp_jax.models.layers import EMBED, HEAD_DIM, HEADS, LAYERS, MLP, VOCAB

FEED_FORWARD_PROJ = ("relu", "gated-gelu")


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_decoder_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  # True (v1.0): head = shared embedding, its input scaled by d_model**-0.5. False (v1.1): own head, unscaled.
  tie_word_embeddings: bool = True
  decoder_start_token_id: int = 0
  pad_token_id: int = 0
  eos_token_id: int | tuple = 1
  model_type: str = "t5"

  def __post_init__(self):
    if self.feed_forward_proj not in FEED_FORWARD_PROJ:
      raise ValueError(f"config field feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                       f"supported: {', '.join(map(repr, FEED_FORWARD_PROJ))}")

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj == "gated-gelu"

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "T5Config":
    """From a Hugging Face `config.json` dict (transformers v4 and v5 spellings).

    v4 configs say whether the head is tied (and hence scaled) in `tie_word_embeddings`. v5 rewrites
    that field to True for every T5 and keeps the distinction in `scale_decoder_outputs`, so that
    field wins when present; an untied config whose checkpoint has no `lm_head.weight` (a v5 save of
    a tied model) gets a copy of the embedding as its head (see `from_hf` below).
    """
    tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    pad = hf.get("pad_token_id", 0)
    pad = 0 if pad is None else pad
    start = hf.get("decoder_start_token_id")
    eos = hf.get("eos_token_id", 1)
    return cls(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        num_layers=hf["num_layers"], num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        num_heads=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"), tie_word_embeddings=bool(tied),
        decoder_start_token_id=pad if start is None else start, pad_token_id=pad,
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, model_type=hf.get("model_type", "t5"))


PRESETS = {
    "t5-small": T5Config(32128, 512, 64, 2048, 6, 6, 8),
    "t5-base": T5Config(32128, 768, 64, 3072, 12, 12, 12),
    "flan-t5-small": T5Config(32128, 512, 64, 1024, 8, 8, 6, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "flan-t5-base": T5Config(32128, 768, 64, 2048, 12, 12, 12, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # microsoft/GODEL-v1_1-base-seq2seq: a t5-base-shaped model (from memory, not checked against the
    # hub here); loading always uses the checkpoint's own config.json, never this preset.
    "godel-v1.1-base": T5Config(32128, 768, 64, 3072, 12, 12, 12),
}


def relative_position_buckets(num_buckets: int, max_distance: int, bidirectional: bool) -> np.ndarray:
  """Bucket of every relative position (key - query) in [-max_distance, max_distance], int32.

  Every |relative position| >= max_distance falls into the last bucket of its side, so clipping a
  relative position to that range and looking it up here is exact. Computed in float32 in the same
  order as Mesh TensorFlow / transformers, so the truncation to an integer bucket agrees with them.
  """
  rel = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)  # later keys (masked anyway) share bucket 0 with distance 0
  max_exact = num_buckets // 2
  # Log-spaced buckets from max_exact up to max_distance; rel 0 is small, so np.maximum only avoids log(0).
  large = max_exact + (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
                       / np.float32(math.log(max_distance / max_exact))
                       * np.float32(num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


def position_bias(table, q_pos, k_pos, cfg: T5Config, *, bidirectional: bool):
  """Relative position bias [B, H, T, S] (fp32) from the table [buckets, H] and positions [B, T], [B, S]."""
  md = cfg.relative_attention_max_distance
  lookup = relative_position_buckets(cfg.relative_attention_num_buckets, md, bidirectional)  # trace-time constant
  rel = jnp.clip(k_pos[:, None, :] - q_pos[:, :, None], -md, md) + md  # [B, T, S]
  bias = table.astype(jnp.float32)[jnp.asarray(lookup)[rel]]          # [B, T, S, H]
  return bias.transpose(0, 3, 1, 2)


def mask_positions(mask):
  """Positions [B, T] counting real tokens only, so left pads and a prefix do not shift distances."""
  return jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)


class Layers(nnx.Module):
  """One stack's layer weights (encoder or decoder), stacked on a leading L axis."""

  def __init__(self, cfg: T5Config, num_layers: int, cross: bool, param_dtype, key):
    n, d, h, dh, f = num_layers, cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff
    keys = iter(jax.random.split(key, 16))
    p = lambda shape, axes: L.param(shape, axes, param_dtype, next(keys))
    norm = lambda: L.param((n, d), (LAYERS, EMBED), param_dtype, "ones")
    self.attn_norm = norm()
    self.wq = p((n, d, h, dh), (LAYERS, EMBED, HEADS, HEAD_DIM))
    self.wk = p((n, d, h, dh), (LAYERS, EMBED, HEADS, HEAD_DIM))
    self.wv = p((n, d, h, dh), (LAYERS, EMBED, HEADS, HEAD_DIM))
    self.wo = p((n, h, dh, d), (LAYERS, HEADS, HEAD_DIM, EMBED))
    # Decoder only: cross-attention over the encoder output.
    self.cross_norm = norm() if cross else None
    self.xq = p((n, d, h, dh), (LAYERS, EMBED, HEADS, HEAD_DIM)) if cross else None
    self.xk = p((n, d, h, dh), (LAYERS, EMBED, HEADS, HEAD_DIM)) if cross else None
    self.xv = p((n, d, h, dh), (LAYERS, EMBED, HEADS, HEAD_DIM)) if cross else None
    self.xo = p((n, h, dh, d), (LAYERS, HEADS, HEAD_DIM, EMBED)) if cross else None
    self.mlp_norm = norm()
    # relu: w_down(relu(w_up x)); gated-gelu: w_down(gelu(w_gate x) * w_up x). HF: wi / wi_0, wi_1; wo.
    self.w_gate = p((n, d, f), (LAYERS, EMBED, MLP)) if cfg.gated else None
    self.w_up = p((n, d, f), (LAYERS, EMBED, MLP))
    self.w_down = p((n, f, d), (LAYERS, MLP, EMBED))

  NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "cross_norm", "xq", "xk", "xv", "xo",
           "mlp_norm", "w_gate", "w_up", "w_down")


class Stack(nnx.Module):
  """An encoder or decoder stack: layers, the shared relative-position table, the final norm."""

  def __init__(self, cfg: T5Config, num_layers: int, cross: bool, param_dtype, key):
    self.layers = Layers(cfg, num_layers, cross, param_dtype, key)
    self.rel_bias = L.param((cfg.relative_attention_num_buckets, cfg.num_heads), (None, HEADS),
                            param_dtype, jax.random.fold_in(key, 1))
    self.final_norm = L.param((cfg.d_model,), (EMBED,), param_dtype, "ones")


def feed_forward(h, w, gated):
  if gated:
    return (jax.nn.gelu(h @ w["w_gate"], approximate=True) * (h @ w["w_up"])) @ w["w_down"]
  return jax.nn.relu(h @ w["w_up"]) @ w["w_down"]


class T5(nnx.Module):
  """`model(input_ids, attention_mask=None, decoder_input_ids=..., decoder_attention_mask=None, *,
  embedded_prefix=None)` -> decoder logits [B, Td, V] (fp32).

  For generation: `encode` once, then `decode` with a `KVCache` from `init_cache` (prefill several
  decoder tokens or feed one per call). Cross-attention keys/values are recomputed from the encoder
  output at each `decode` call unless `cross_kv(encoder_out)` is passed as `cross_kv=`; a sampling
  loop should pass it, since on long inputs that projection costs more than the rest of a one-token step.
  """

  def __init__(self, cfg: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    key = rngs.params()
    self.shared = L.param((cfg.vocab_size, cfg.d_model), (VOCAB, EMBED), param_dtype, key)
    self.encoder = Stack(cfg, cfg.num_layers, False, param_dtype, jax.random.fold_in(key, 1))
    self.decoder = Stack(cfg, cfg.num_decoder_layers, True, param_dtype, jax.random.fold_in(key, 2))
    self.lm_head = (None if cfg.tie_word_embeddings else
                    L.param((cfg.d_model, cfg.vocab_size), (EMBED, VOCAB), param_dtype, jax.random.fold_in(key, 3)))

  def init_cache(self, batch: int, max_len: int) -> L.KVCache:
    """The decoder self-attention cache for `max_len` decoder tokens."""
    c = self.cfg
    return L.KVCache.create(c.num_decoder_layers, batch, max_len, c.num_heads, c.d_kv, self.dtype)

  def embed_tokens(self, input_ids):
    return self.shared[...][input_ids].astype(self.dtype)

  def _weights(self, stack: Stack):
    return jax.tree.map(lambda a: a.astype(self.dtype), L.values(stack.layers, Layers.NAMES))

  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
               embedded_prefix=None, prefix_mask=None):
    if decoder_input_ids is None:
      raise ValueError("T5 needs decoder_input_ids (targets shifted right behind "
                       f"decoder_start_token_id={self.cfg.decoder_start_token_id}; see `shift_right`)")
    encoder_out, encoder_mask = self.encode(input_ids, attention_mask, embedded_prefix=embedded_prefix,
                                            prefix_mask=prefix_mask)
    return self.decode(decoder_input_ids, encoder_out, encoder_mask, decoder_attention_mask=decoder_attention_mask)

  def encode(self, input_ids, attention_mask=None, *, embedded_prefix=None, prefix_mask=None):
    """Encoder hidden states [B, P+S, D] after the final norm, and their mask [B, P+S] (prefix: ones
    unless `prefix_mask` says otherwise)."""
    cfg = self.cfg
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    x, mask, _ = L.join_prefix(self.embed_tokens(input_ids), mask, embedded_prefix, prefix_mask)
    pos = mask_positions(mask)
    bias = position_bias(self.encoder.rel_bias[...], pos, pos, cfg, bidirectional=True)  # [B, H, S, S]
    attn_mask = jnp.broadcast_to(mask[:, None, :], (mask.shape[0], mask.shape[1], mask.shape[1]))

    def layer(x, w):
      h = L.rms_norm(x, w["attn_norm"], cfg.layer_norm_epsilon)
      q, k, v = (jnp.einsum("bsd,dhk->bshk", h, w[n]) for n in ("wq", "wk", "wv"))
      a = L.attention(q, k, v, attn_mask, scale=1.0, bias=bias)
      x = x + jnp.einsum("bshk,hkd->bsd", a, w["wo"])
      h = L.rms_norm(x, w["mlp_norm"], cfg.layer_norm_epsilon)
      return x + feed_forward(h, w, cfg.gated), None

    x, _ = jax.lax.scan(layer, x, self._weights(self.encoder))
    return L.rms_norm(x, self.encoder.final_norm[...].astype(self.dtype), cfg.layer_norm_epsilon), mask

  def cross_kv(self, encoder_out):
    """Cross-attention keys and values of every decoder layer, each [L, B, S, H, Dh]."""
    w = self._weights(self.decoder)
    enc = encoder_out.astype(self.dtype)
    return (jnp.einsum("bsd,ldhk->lbshk", enc, w["xk"]), jnp.einsum("bsd,ldhk->lbshk", enc, w["xv"]))

  def decode(self, decoder_input_ids, encoder_out, encoder_mask, *, decoder_attention_mask=None, cache=None,
             cross_kv=None):
    """Decoder logits [B, T, V] (fp32), or (logits, cache) when a `KVCache` is passed.

    With a cache, the new tokens follow those already cached: their positions (and so their relative
    position bias) count the real decoder tokens before them.
    """
    cfg = self.cfg
    b, t = decoder_input_ids.shape
    mask = (jnp.ones((b, t), bool) if decoder_attention_mask is None else decoder_attention_mask.astype(bool))
    q_pos, self_mask, new_cache = L.positions_and_mask(mask, cache)
    k_pos = q_pos if cache is None else mask_positions(new_cache.valid)  # [B, S]
    bias = position_bias(self.decoder.rel_bias[...], q_pos, k_pos, cfg, bidirectional=False)  # [B, H, T, S]
    cross_mask = encoder_mask.astype(bool)[:, None, :]  # [B, 1, S_enc]: broadcasts over T
    enc = encoder_out.astype(self.dtype)
    w = self._weights(self.decoder)
    xk, xv = (None, None) if cross_kv is None else cross_kv

    def layer(x, xs):
      w, kc, vc, ck, cv = xs
      h = L.rms_norm(x, w["attn_norm"], cfg.layer_norm_epsilon)
      q, k, v = (jnp.einsum("btd,dhk->bthk", h, w[n]) for n in ("wq", "wk", "wv"))
      if kc is None:
        a, new_kv = L.attention(q, k, v, self_mask, scale=1.0, bias=bias), (None, None)
      else:  # attend over the cache plus this call's keys; return only the new ones
        a, new_kv = L.cached_attention(q, k, v, kc, vc, cache.index, self_mask, scale=1.0, bias=bias,
                                        empty=cache.empty), (k, v)
      x = x + jnp.einsum("bthk,hkd->btd", a, w["wo"])
      h = L.rms_norm(x, w["cross_norm"], cfg.layer_norm_epsilon)
      q = jnp.einsum("btd,dhk->bthk", h, w["xq"])
      if ck is None:
        ck, cv = jnp.einsum("bsd,dhk->bshk", enc, w["xk"]), jnp.einsum("bsd,dhk->bshk", enc, w["xv"])
      a = L.attention(q, ck.astype(self.dtype), cv.astype(self.dtype), cross_mask, scale=1.0)
      x = x + jnp.einsum("bthk,hkd->btd", a, w["xo"])
      h = L.rms_norm(x, w["mlp_norm"], cfg.layer_norm_epsilon)
      return x + feed_forward(h, w, cfg.gated), new_kv

    kv = (None, None) if cache is None else (cache.k, cache.v)
    x = self.embed_tokens(decoder_input_ids)
    x, (k_all, v_all) = jax.lax.scan(layer, x, (w, *kv, xk, xv))
    h = L.rms_norm(x, self.decoder.final_norm[...].astype(self.dtype), cfg.layer_norm_epsilon)
    if cfg.tie_word_embeddings:
      h, head = h * cfg.d_model ** -0.5, self.shared[...].T
    else:
      head = self.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", h, head.astype(self.dtype), preferred_element_type=jnp.float32)
    if cache is None:
      return logits
    return logits, L.write_cache(new_cache, k_all, v_all, cache.index)


def shift_right(labels, cfg: T5Config):
  """Decoder inputs for teacher forcing: labels [B, T] shifted right behind decoder_start_token_id;
  ignored labels (-100) become pad (transformers' `_shift_right`)."""
  labels = jnp.asarray(labels)
  start = jnp.full((labels.shape[0], 1), cfg.decoder_start_token_id, labels.dtype)
  shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
  return jnp.where(shifted == -100, cfg.pad_token_id, shifted)


def from_hf(cfg: T5Config, get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
  """Our parameter paths -> arrays, from HF tensor names (`get(name)` returns torch (out, in) layout).

  Only `shared.weight` is read for the embedding: checkpoints may or may not also store the
  `encoder/decoder.embed_tokens.weight` copies.
  """
  h, dh, d = cfg.num_heads, cfg.d_kv, cfg.d_model
  shared = get("shared.weight")
  out = {"shared": shared}

  def stack(prefix, n, cross):
    layer = lambda name: np.stack([get(f"{prefix}.block.{i}.layer.{name}") for i in range(n)])
    # torch Linear stores (out, in); we keep (in, out...) so einsums read left to right.
    qkv = lambda name: layer(name).reshape(n, h, dh, d).transpose(0, 3, 1, 2)  # [L, D, H, Dh]
    o = lambda name: layer(name).reshape(n, d, h, dh).transpose(0, 2, 3, 1)    # [L, H, Dh, D]
    ff = 2 if cross else 1
    s = {
        "rel_bias": get(f"{prefix}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        "final_norm": get(f"{prefix}.final_layer_norm.weight"),
        "layers.attn_norm": layer("0.layer_norm.weight"),
        "layers.wq": qkv("0.SelfAttention.q.weight"), "layers.wk": qkv("0.SelfAttention.k.weight"),
        "layers.wv": qkv("0.SelfAttention.v.weight"), "layers.wo": o("0.SelfAttention.o.weight"),
        "layers.mlp_norm": layer(f"{ff}.layer_norm.weight"),
        "layers.w_down": layer(f"{ff}.DenseReluDense.wo.weight").transpose(0, 2, 1),
    }
    if cfg.gated:
      s["layers.w_gate"] = layer(f"{ff}.DenseReluDense.wi_0.weight").transpose(0, 2, 1)
      s["layers.w_up"] = layer(f"{ff}.DenseReluDense.wi_1.weight").transpose(0, 2, 1)
    else:
      s["layers.w_up"] = layer(f"{ff}.DenseReluDense.wi.weight").transpose(0, 2, 1)
    if cross:
      s["layers.cross_norm"] = layer("1.layer_norm.weight")
      s["layers.xq"], s["layers.xk"] = qkv("1.EncDecAttention.q.weight"), qkv("1.EncDecAttention.k.weight")
      s["layers.xv"], s["layers.xo"] = qkv("1.EncDecAttention.v.weight"), o("1.EncDecAttention.o.weight")
    return {f"{prefix}.{k}": v for k, v in s.items()}

  out.update(stack("encoder", cfg.num_layers, cross=False))
  out.update(stack("decoder", cfg.num_decoder_layers, cross=True))
  try:
    head = get("lm_head.weight")
  except (KeyError, ValueError):  # not stored: the head is the embedding (v5 saves of tied models)
    head = None
  if cfg.tie_word_embeddings:
    if head is not None and not np.array_equal(head, shared):
      raise ValueError("the config ties the head to the embedding (T5 v1.0: tie_word_embeddings / "
                       "scale_decoder_outputs true) but lm_head.weight differs from shared.weight")
  else:
    out["lm_head"] = (shared if head is None else head).T
  return out
