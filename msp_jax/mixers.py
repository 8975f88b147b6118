"""Mixers: turn the soft prompts of an example's k attributes into one attribute prefix.

All mixers are batched and jittable. Inputs:
  prompts [B, M, N, D]  the attribute prompts of each example, padded to M (max mixture size);
                        valid attributes come first, in sorted order
  mask    [B, M] bool   which of the M slots hold a real attribute
  text    [B, D]        max-pooled token embeddings of the example's text (for attention/bottleneck)
Output: (prefix [B, A, D], prefix_mask [B, A] bool). Padding slots never change the output; a row
with no attribute at all gives an all-masked prefix (every mixer), so the backbone never attends to
it: that row sees the instruction prompt alone.

Departure from the original code, on purpose: its attention and bottleneck mixers took the softmax
over the embedding axis and then summed it out, which reduces to a plain sum of the prompts. Here the
softmax runs over the *attributes*, so the text decides how much each attribute contributes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class PromptParam(nnx.Param):
  """The one variable type that training updates: prompts and mixer weights. Everything else
  (the backbone) is frozen structurally, by `nnx.split(model, PromptParam, ...)`."""


def _any_attribute(mask, n: int):
  """[B, n]: a row's n mixed tokens are real iff it has at least one attribute (else zeros, masked)."""
  return jnp.broadcast_to(mask.any(1)[:, None], (mask.shape[0], n))


def _masked_mean(x, mask):  # x [B, M, ...], mask [B, M]
  w = mask.astype(x.dtype).reshape(mask.shape + (1,) * (x.ndim - 2))
  return (x * w).sum(1) / jnp.maximum(w.sum(1), 1)


class Concat(nnx.Module):
  """The k prompts one after another: [B, M*N, D], padding slots masked out (positions skip them)."""
  widens_prefix = True  # the backbone sees N prefix tokens per attribute slot, padding slots included

  def __init__(self, dim: int, *, rngs: nnx.Rngs, **unused):
    pass

  def __call__(self, prompts, mask, text=None):
    b, m, n, d = prompts.shape
    return prompts.reshape(b, m * n, d), jnp.repeat(mask, n, axis=1)


class Pooling(nnx.Module):
  """Masked mean of the k prompts: [B, N, D]."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, **unused):
    pass

  def __call__(self, prompts, mask, text=None):
    return _masked_mean(prompts, mask), _any_attribute(mask, prompts.shape[2])


class Attention(nnx.Module):
  """A learned query from the text scores each attribute; softmax over attributes; weighted sum.

  score_j = <W_q text, mean_n P_j> / (sqrt(D) * temperature)
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs, temperature: float = 1.0, **unused):
    self.temperature = temperature
    self.query = PromptParam(jax.random.normal(rngs.params(), (dim, dim)) * dim ** -0.5)

  def keys(self, prompts):
    return prompts.mean(2)  # [B, M, D]: one summary vector per attribute prompt

  def weights(self, prompts, mask, text):
    """Mixture weights [B, M] (zero on padding slots, sum to one over real attributes)."""
    q = text.astype(jnp.float32) @ self.query[...]
    scores = jnp.einsum("bd,bmd->bm", q, self.keys(prompts).astype(jnp.float32))
    scores = scores / (prompts.shape[-1] ** 0.5 * self.temperature)
    # -1e30 rather than -inf: a row without attributes gets zeros, not NaN (nor NaN gradients).
    return (jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1) * mask).astype(prompts.dtype)

  def __call__(self, prompts, mask, text):
    mixed = jnp.einsum("bm,bmnd->bnd", self.weights(prompts, mask, text), prompts)
    return mixed, _any_attribute(mask, mixed.shape[1])


class Bottleneck(Attention):
  """Attention whose attribute summaries pass a residual down -> SiLU -> up projection first, so the
  scoring space is learned rather than the raw prompt space (hidden size default 300)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, temperature: float = 1.0, hidden: int = 300, **unused):
    super().__init__(dim, rngs=rngs, temperature=temperature)
    self.down = PromptParam(jax.random.normal(rngs.params(), (dim, hidden)) * dim ** -0.5)
    self.up = PromptParam(jnp.zeros((hidden, dim)))  # starts as the identity map

  def keys(self, prompts):
    k = prompts.mean(2)
    return k + jax.nn.silu(k @ self.down[...].astype(k.dtype)) @ self.up[...].astype(k.dtype)


class CNN(nnx.Module):
  """A 1-D convolution across the stacked attribute prompts (per prompt token), then a masked mean.

  Padding slots are zeroed before and after the convolution; since real attributes come first, the
  last real one sees zeros beyond it whether they are padding slots or the edge: mask invariant.
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs, kernel_size: int = 2, **unused):
    eye = jnp.zeros((kernel_size, dim, dim)).at[(kernel_size - 1) // 2].set(jnp.eye(dim))  # SAME's centre tap
    noise = jax.random.normal(rngs.params(), (kernel_size, dim, dim)) * 0.01 * dim ** -0.5
    self.kernel = PromptParam(eye + noise)  # near identity: starts close to pooling
    self.bias = PromptParam(jnp.zeros((dim,)))

  def __call__(self, prompts, mask, text=None):
    b, m, n, d = prompts.shape
    x = jnp.where(mask[:, :, None, None], prompts, 0)
    x = x.transpose(0, 2, 1, 3).reshape(b * n, m, d)  # convolve along the attribute axis
    y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(x.dtype), (1,), "SAME",
                                     dimension_numbers=("NWC", "WIO", "NWC")) + self.bias[...].astype(x.dtype)
    y = y.reshape(b, n, m, d).transpose(0, 2, 1, 3)
    return _masked_mean(y, mask), _any_attribute(mask, n)


MIXERS = {"concat": Concat, "pooling": Pooling, "attention": Attention, "bottleneck": Bottleneck, "cnn": CNN}


def widens_prefix(name: str) -> bool:
  """Whether mixer `name`'s output grows with the attribute axis M (concat); the others give N tokens."""
  return getattr(MIXERS.get(name), "widens_prefix", False)


def make_mixer(name: str, dim: int, *, rngs: nnx.Rngs, **options) -> nnx.Module:
  if name not in MIXERS:
    raise ValueError(f"mixture {name!r} is not supported; valid: {', '.join(MIXERS)}")
  return MIXERS[name](dim, rngs=rngs, **options)
