"""GPT-2 family: gpt2, gpt2-medium / large / xl, distilgpt2.

Pre-norm decoder: LayerNorm -> multi-head attention -> LayerNorm -> GELU MLP, learned absolute
positions added to the input embeddings, head tied to the token embedding. Weights come from
Hugging Face names (`from_hf`); GPT-2's Conv1D already stores (in, out), so unlike Llama's torch
Linear nothing is transposed, only split into heads.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msp_jax.models import layers as L
from msp_jax.models.layers import EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, MLP, VOCAB

# HF activation_function -> ours. The gelu_new / pytorch_tanh / fast trio are one formula
# (the tanh approximation) written three ways; plain "gelu" is the exact erf form.
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  max_positions: int          # n_positions: rows of the learned position table
  intermediate_size: int = 0  # 0: 4 * hidden_size (HF's n_inner=None)
  layer_norm_eps: float = 1e-5
  activation: str = "gelu_new"
  scale_attn_weights: bool = True                # divide attention logits by sqrt(head_dim)
  scale_attn_by_inverse_layer_idx: bool = False  # and by (layer index + 1), as some Megatron ports do
  tie_word_embeddings: bool = True
  model_type: str = "gpt2"

  def __post_init__(self):
    if not self.intermediate_size:
      object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"config field activation_function={self.activation!r} is not supported; "
                       f"supported: {', '.join(ACTIVATIONS)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"config field n_embd={self.hidden_size} is not divisible by n_head={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "GPT2Config":
    """From a Hugging Face `config.json` dict (GPT-2 names, or the generic aliases)."""
    g = lambda name, alias, default=None: hf.get(name, hf.get(alias, default))
    if hf.get("add_cross_attention"):
      raise ValueError("config field add_cross_attention=True is not supported; supported: False")
    # reorder_and_upcast_attn only asks for fp32 attention logits, which `layers.attention` always
    # computes, so it needs no flag here.
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=g("n_embd", "hidden_size"),
        num_layers=g("n_layer", "num_hidden_layers"), num_heads=g("n_head", "num_attention_heads"),
        max_positions=g("n_positions", "max_position_embeddings"),
        intermediate_size=hf.get("n_inner") or 0,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=hf.get("activation_function", "gelu_new"),
        scale_attn_weights=hf.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        model_type=hf.get("model_type", "gpt2"))


PRESETS = {
    "gpt2": GPT2Config(50257, 768, 12, 12, 1024),
    "gpt2-medium": GPT2Config(50257, 1024, 24, 16, 1024),
    "gpt2-large": GPT2Config(50257, 1280, 36, 20, 1024),
    "gpt2-xl": GPT2Config(50257, 1600, 48, 25, 1024),
    "distilgpt2": GPT2Config(50257, 768, 6, 12, 1024),
}


class Layers(nnx.Module):
  """All decoder layers' weights, stacked on a leading L axis."""

  def __init__(self, cfg: GPT2Config, param_dtype, key):
    n, d, h, dh, f = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    keys = iter(jax.random.split(key, 16))
    p = lambda shape, axes: L.param(shape, axes, param_dtype, next(keys))
    self.attn_norm = L.param((n, d), (LAYERS, EMBED), param_dtype, "ones")
    self.attn_norm_bias = L.param((n, d), (LAYERS, EMBED), param_dtype)
    # GPT-2 has no GQA: K == H, but k/v keep the kv_heads axis name so partition rules are shared.
    self.wq = p((n, d, h, dh), (LAYERS, EMBED, HEADS, HEAD_DIM))
    self.wk = p((n, d, h, dh), (LAYERS, EMBED, KV_HEADS, HEAD_DIM))
    self.wv = p((n, d, h, dh), (LAYERS, EMBED, KV_HEADS, HEAD_DIM))
    self.bq = p((n, h, dh), (LAYERS, HEADS, HEAD_DIM))
    self.bk = p((n, h, dh), (LAYERS, KV_HEADS, HEAD_DIM))
    self.bv = p((n, h, dh), (LAYERS, KV_HEADS, HEAD_DIM))
    self.wo = p((n, h, dh, d), (LAYERS, HEADS, HEAD_DIM, EMBED))
    self.bo = p((n, d), (LAYERS, EMBED))
    self.mlp_norm = L.param((n, d), (LAYERS, EMBED), param_dtype, "ones")
    self.mlp_norm_bias = L.param((n, d), (LAYERS, EMBED), param_dtype)
    self.w_up = p((n, d, f), (LAYERS, EMBED, MLP))
    self.b_up = p((n, f), (LAYERS, MLP))
    self.w_down = p((n, f, d), (LAYERS, MLP, EMBED))
    self.b_down = p((n, d), (LAYERS, EMBED))

  NAMES = ("attn_norm", "attn_norm_bias", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo",
           "mlp_norm", "mlp_norm_bias", "w_up", "b_up", "w_down", "b_down")


class GPT2(L.DecoderLM):
  """GPT-2; called as `L.DecoderLM` says. Token embeddings carry no positions: `hidden_states` adds
  them, to the embedded prefix as well.

  Positions come from the attention mask and count the prefix's unmasked slots too. A position past the learned
  table (>= `max_positions`, 1024 for the released checkpoints) reuses its last row: a jitted step
  cannot raise on a traced value, and HF would fail with an index error there instead. Callers that
  care (the sampler) keep prefix + prompt + new tokens <= `max_positions`.
  """

  def __init__(self, cfg: GPT2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    key = rngs.params()
    self.embed = L.param((cfg.vocab_size, cfg.hidden_size), (VOCAB, EMBED), param_dtype, key)
    self.pos_embed = L.param((cfg.max_positions, cfg.hidden_size), (None, EMBED), param_dtype, jax.random.fold_in(key, 3))
    self.layers = Layers(cfg, param_dtype, jax.random.fold_in(key, 1))
    self.norm = L.param((cfg.hidden_size,), (EMBED,), param_dtype, "ones")
    self.norm_bias = L.param((cfg.hidden_size,), (EMBED,), param_dtype)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    L.param((cfg.hidden_size, cfg.vocab_size), (EMBED, VOCAB), param_dtype, jax.random.fold_in(key, 2)))

  def init_cache(self, batch: int, max_len: int) -> L.KVCache:
    c = self.cfg
    return L.KVCache.create(c.num_layers, batch, max_len, c.num_heads, c.head_dim, self.dtype)

  def hidden_states(self, x, mask, cache=None):
    """Final-normed hidden states [B, T, D] of embeddings x (without positions) with mask [B, T]."""
    cfg, dt = self.cfg, self.dtype
    positions, attn_mask, new_cache = L.positions_and_mask(mask, cache)
    positions = jnp.minimum(positions, cfg.max_positions - 1)  # see the class docstring
    x = x + self.pos_embed[...][positions].astype(dt)  # [B, T, D]
    w = jax.tree.map(lambda a: a.astype(dt), L.values(self.layers, Layers.NAMES))
    scale = (cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0) * np.ones(cfg.num_layers, np.float32)
    if cfg.scale_attn_by_inverse_layer_idx:
      scale = scale / np.arange(1, cfg.num_layers + 1, dtype=np.float32)
    act = ACTIVATIONS[cfg.activation]

    def layer(x, xs):
      w, s, kc, vc = xs
      h = L.layer_norm(x, w["attn_norm"], w["attn_norm_bias"], cfg.layer_norm_eps)
      q = jnp.einsum("btd,dhk->bthk", h, w["wq"]) + w["bq"]
      k = jnp.einsum("btd,dhk->bthk", h, w["wk"]) + w["bk"]
      v = jnp.einsum("btd,dhk->bthk", h, w["wv"]) + w["bv"]
      if kc is None:
        a, new_kv = L.attention(q, k, v, attn_mask, scale=s), (None, None)
      else:  # attend over the cache plus this call's keys; return only the new ones
        a, new_kv = L.cached_attention(q, k, v, kc, vc, cache.index, attn_mask, scale=s, empty=cache.empty), (k, v)
      x = x + jnp.einsum("bthk,hkd->btd", a, w["wo"]) + w["bo"]
      h = L.layer_norm(x, w["mlp_norm"], w["mlp_norm_bias"], cfg.layer_norm_eps)
      x = x + act(h @ w["w_up"] + w["b_up"]) @ w["w_down"] + w["b_down"]
      return x, new_kv

    kv = (None, None) if cache is None else (cache.k, cache.v)
    x, (k_all, v_all) = jax.lax.scan(layer, x, (w, jnp.asarray(scale), *kv))
    if cache is not None:
      new_cache = L.write_cache(new_cache, k_all, v_all, cache.index)
    return L.layer_norm(x, self.norm[...], self.norm_bias[...], cfg.layer_norm_eps), new_cache


def from_hf(cfg: GPT2Config, get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
  """Our parameter paths -> arrays, from HF tensor names.

  `GPT2LMHeadModel` checkpoints name tensors `transformer.h.0...`; bare `GPT2Model` ones (the
  original `gpt2` repo) drop the `transformer.` prefix. Which one is probed once, on `wte`, so a
  missing tensor is later reported under the checkpoint's own spelling.
  """
  n, h, dh, d = cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.hidden_size
  try:
    wte, pre = get("transformer.wte.weight"), "transformer."
  except (KeyError, ValueError) as first:
    try:
      wte, pre = get("wte.weight"), ""
    except (KeyError, ValueError):
      raise first from None
  layer = lambda name: np.stack([get(f"{pre}h.{i}.{name}") for i in range(n)])
  # Conv1D stores (in, out): c_attn's out axis is [q | k | v], each split into (heads, head_dim).
  qkv = layer("attn.c_attn.weight").reshape(n, d, 3, h, dh)
  qkv_bias = layer("attn.c_attn.bias").reshape(n, 3, h, dh)
  out = {
      "embed": wte,
      "pos_embed": get(f"{pre}wpe.weight"),
      "norm": get(f"{pre}ln_f.weight"),
      "norm_bias": get(f"{pre}ln_f.bias"),
      "layers.attn_norm": layer("ln_1.weight"),
      "layers.attn_norm_bias": layer("ln_1.bias"),
      "layers.wq": qkv[:, :, 0], "layers.wk": qkv[:, :, 1], "layers.wv": qkv[:, :, 2],
      "layers.bq": qkv_bias[:, 0], "layers.bk": qkv_bias[:, 1], "layers.bv": qkv_bias[:, 2],
      "layers.wo": layer("attn.c_proj.weight").reshape(n, h, dh, d),
      "layers.bo": layer("attn.c_proj.bias"),
      "layers.mlp_norm": layer("ln_2.weight"),
      "layers.mlp_norm_bias": layer("ln_2.bias"),
      "layers.w_up": layer("mlp.c_fc.weight"),
      "layers.b_up": layer("mlp.c_fc.bias"),
      "layers.w_down": layer("mlp.c_proj.weight"),
      "layers.b_down": layer("mlp.c_proj.bias"),
  }
  if not cfg.tie_word_embeddings:
    out["lm_head"] = get("lm_head.weight").T  # a torch Linear: (out, in)
  return out
