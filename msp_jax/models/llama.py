"""Llama family: Llama 2 / 3.x, SmolLM / SmolLM2, Qwen2 / 2.5, Mistral-style GQA.

Pre-norm decoder: RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU MLP, tied or untied
head. Qwen2 differs only by q/k/v biases; Llama 3.x by its `rope_scaling`. Weights come from
Hugging Face names (`from_hf`), so a safetensors folder and a dequantised GGUF load alike.
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
from msp_jax.models.layers import EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, MLP, VOCAB


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # sorted (key, value) items of HF's rope_scaling dict
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  o_bias: bool = False    # Llama's attention_bias also biases o_proj
  mlp_bias: bool = False
  model_type: str = "llama"

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
    """From a Hugging Face `config.json` dict (transformers v4 and v5 spellings)."""
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"config field hidden_act={hf['hidden_act']!r} is not supported; supported: 'silu'")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    heads = hf["num_attention_heads"]
    qwen = hf.get("model_type") == "qwen2"
    bias = hf.get("attention_bias", False)
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=float(theta),
        rope_scaling=None if rope_type == "default" else tuple(sorted(rope.items())),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=qwen or bias, o_bias=bias and not qwen, mlp_bias=hf.get("mlp_bias", False),
        model_type=hf.get("model_type", "llama"))


PRESETS = {
    "smollm2-135m": LlamaConfig(49152, 576, 1536, 30, 9, 3, 64, 100000.0, None, 1e-5, True, model_type="llama"),
    "smollm2-360m": LlamaConfig(49152, 960, 2560, 32, 15, 5, 64, 100000.0, None, 1e-5, True, model_type="llama"),
    "llama3.2-1b": LlamaConfig(
        128256, 2048, 8192, 16, 32, 8, 64, 500000.0,
        (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
         ("original_max_position_embeddings", 8192), ("rope_type", "llama3")), 1e-5, True),
    "qwen2.5-0.5b": LlamaConfig(151936, 896, 4864, 24, 14, 2, 64, 1000000.0, None, 1e-6, True,
                                qkv_bias=True, model_type="qwen2"),
}


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [Dh/2], with Llama 3's or linear `rope_scaling` applied."""
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
  scaling = dict(cfg.rope_scaling or ())
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "linear":
    inv = inv / scaling["factor"]
  elif kind == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    inv = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  elif kind != "default":
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3")
  return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
  """Rotates x [B, T, N, Dh] by positions [B, T] (HF's rotate_half layout), in fp32."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  return (x32 * cos + jnp.concatenate([-x2, x1], -1) * sin).astype(x.dtype)


class Layers(nnx.Module):
  """All decoder layers' weights, stacked on a leading L axis."""

  def __init__(self, cfg: LlamaConfig, param_dtype, key):
    n, d, h, k, dh, f = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    keys = iter(jax.random.split(key, 16))
    p = lambda shape, axes, random=True: L.param(shape, axes, param_dtype, next(keys) if random else None)
    self.attn_norm = L.param((n, d), (LAYERS, EMBED), param_dtype, "ones")
    self.wq = p((n, d, h, dh), (LAYERS, EMBED, HEADS, HEAD_DIM))
    self.wk = p((n, d, k, dh), (LAYERS, EMBED, KV_HEADS, HEAD_DIM))
    self.wv = p((n, d, k, dh), (LAYERS, EMBED, KV_HEADS, HEAD_DIM))
    self.wo = p((n, h, dh, d), (LAYERS, HEADS, HEAD_DIM, EMBED))
    self.bq = p((n, h, dh), (LAYERS, HEADS, HEAD_DIM)) if cfg.qkv_bias else None
    self.bk = p((n, k, dh), (LAYERS, KV_HEADS, HEAD_DIM)) if cfg.qkv_bias else None
    self.bv = p((n, k, dh), (LAYERS, KV_HEADS, HEAD_DIM)) if cfg.qkv_bias else None
    self.bo = p((n, d), (LAYERS, EMBED)) if cfg.o_bias else None
    self.mlp_norm = L.param((n, d), (LAYERS, EMBED), param_dtype, "ones")
    self.w_gate = p((n, d, f), (LAYERS, EMBED, MLP))
    self.w_up = p((n, d, f), (LAYERS, EMBED, MLP))
    self.w_down = p((n, f, d), (LAYERS, MLP, EMBED))
    self.b_gate = p((n, f), (LAYERS, MLP)) if cfg.mlp_bias else None
    self.b_up = p((n, f), (LAYERS, MLP)) if cfg.mlp_bias else None
    self.b_down = p((n, d), (LAYERS, EMBED)) if cfg.mlp_bias else None

  NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "mlp_norm",
           "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


class Llama(L.DecoderLM):
  """Llama family (SmolLM2, Llama, Qwen2); called as `L.DecoderLM` says."""

  def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    key = rngs.params()
    self.embed = L.param((cfg.vocab_size, cfg.hidden_size), (VOCAB, EMBED), param_dtype, key)
    self.layers = Layers(cfg, param_dtype, jax.random.fold_in(key, 1))
    self.norm = L.param((cfg.hidden_size,), (EMBED,), param_dtype, "ones")
    self.lm_head = (None if cfg.tie_word_embeddings else
                    L.param((cfg.hidden_size, cfg.vocab_size), (EMBED, VOCAB), param_dtype, jax.random.fold_in(key, 2)))

  def init_cache(self, batch: int, max_len: int) -> L.KVCache:
    c = self.cfg
    return L.KVCache.create(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, self.dtype)

  def hidden_states(self, x, mask, cache=None):
    """Final-normed hidden states [B, T, D] of embeddings x with mask [B, T]."""
    cfg, dt = self.cfg, self.dtype
    positions, attn_mask, new_cache = L.positions_and_mask(mask, cache)
    inv_freq = rope_frequencies(cfg)  # a trace-time constant, not state
    w = jax.tree.map(lambda a: a.astype(dt), L.values(self.layers, Layers.NAMES))

    def layer(x, xs):
      w, kc, vc = xs
      h = L.rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
      q = jnp.einsum("btd,dhk->bthk", h, w["wq"])
      k = jnp.einsum("btd,dhk->bthk", h, w["wk"])
      v = jnp.einsum("btd,dhk->bthk", h, w["wv"])
      if "bq" in w:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
      q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
      if kc is None:
        a, new_kv = L.attention(q, k, v, attn_mask, scale=cfg.head_dim ** -0.5), (None, None)
      else:  # attend over the cache plus this call's keys; return only the new ones
        a, new_kv = L.cached_attention(q, k, v, kc, vc, cache.index, attn_mask, scale=cfg.head_dim ** -0.5,
                                        empty=cache.empty), (k, v)
      a = jnp.einsum("bthk,hkd->btd", a, w["wo"])
      x = x + (a + w["bo"] if "bo" in w else a)
      h = L.rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
      gate, up = h @ w["w_gate"], h @ w["w_up"]
      if "b_gate" in w:
        gate, up = gate + w["b_gate"], up + w["b_up"]
      down = (jax.nn.silu(gate) * up) @ w["w_down"]
      x = x + (down + w["b_down"] if "b_down" in w else down)
      return x, new_kv

    kv = (None, None) if cache is None else (cache.k, cache.v)
    x, (k_all, v_all) = jax.lax.scan(layer, x, (w, *kv))
    if cache is not None:
      new_cache = L.write_cache(new_cache, k_all, v_all, cache.index)
    return L.rms_norm(x, self.norm[...].astype(dt), cfg.rms_norm_eps), new_cache


def from_hf(cfg: LlamaConfig, get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
  """Our parameter paths -> arrays, from HF tensor names (`get(name)` returns torch (out, in) layout)."""
  n, h, k, dh, d = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  layer = lambda name: np.stack([get(f"model.layers.{i}.{name}") for i in range(n)])
  out = {
      "embed": get("model.embed_tokens.weight"),
      "norm": get("model.norm.weight"),
      "layers.attn_norm": layer("input_layernorm.weight"),
      "layers.mlp_norm": layer("post_attention_layernorm.weight"),
      # torch Linear stores (out, in); we keep (in, out...) so einsums read left to right.
      "layers.wq": layer("self_attn.q_proj.weight").reshape(n, h, dh, d).transpose(0, 3, 1, 2),
      "layers.wk": layer("self_attn.k_proj.weight").reshape(n, k, dh, d).transpose(0, 3, 1, 2),
      "layers.wv": layer("self_attn.v_proj.weight").reshape(n, k, dh, d).transpose(0, 3, 1, 2),
      "layers.wo": layer("self_attn.o_proj.weight").reshape(n, d, h, dh).transpose(0, 2, 3, 1),
      "layers.w_gate": layer("mlp.gate_proj.weight").transpose(0, 2, 1),
      "layers.w_up": layer("mlp.up_proj.weight").transpose(0, 2, 1),
      "layers.w_down": layer("mlp.down_proj.weight").transpose(0, 2, 1),
  }
  if cfg.qkv_bias:
    out["layers.bq"] = layer("self_attn.q_proj.bias").reshape(n, h, dh)
    out["layers.bk"] = layer("self_attn.k_proj.bias").reshape(n, k, dh)
    out["layers.bv"] = layer("self_attn.v_proj.bias").reshape(n, k, dh)
  if cfg.o_bias:
    out["layers.bo"] = layer("self_attn.o_proj.bias")
  if cfg.mlp_bias:
    for ours, theirs in (("b_gate", "gate_proj"), ("b_up", "up_proj"), ("b_down", "down_proj")):
      out[f"layers.{ours}"] = layer(f"mlp.{theirs}.bias")
  if not cfg.tie_word_embeddings:
    out["lm_head"] = get("lm_head.weight").T
  return out
