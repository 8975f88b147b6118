"""cuDNN's fused attention (GPU, bf16): its values against float64 attention computed in numpy, its
gradients against the einsum form's float32 gradients on the CPU.

Skipped without a GPU (CI has none); `benchmarks/gpu.sh`'s machine runs it. Everywhere else `attention`
takes the einsum form, which the backbone parity tests against transformers cover.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msp_jax.models import layers

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on a GPU only")

B, T, H, K, DH = 3, 40, 9, 3, 64  # SmolLM2's heads: 9 query heads over 3 key/value heads


def reference(q, k, v, mask, scale):
  """float64 grouped-query attention (rows with no key attended are never read)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k) * scale
  logits = np.where(mask[:, None], logits, -1e30)
  logits -= logits.max(-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def inputs():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((B, T, H, DH), (B, T, K, DH), (B, T, K, DH)))
  valid = np.ones((B, T), bool)
  valid[1, :7] = False   # left padding, as the sampler's and the grid's batches have
  valid[2, 30:] = False  # right padding
  mask = np.tril(np.ones((T, T), bool))[None] & valid[:, None, :] & valid[:, :, None]
  return q, k, v, mask, valid


def test_fused_attention_matches_float64_attention():
  q, k, v, mask, valid = inputs()
  assert layers.fused_attention_applies(jnp.asarray(q, jnp.bfloat16))
  out = layers.attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), jnp.asarray(mask), scale=DH ** -0.5)
  ref = reference(*(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k, v)), mask, DH ** -0.5)
  got = np.asarray(out, np.float64)[valid]
  err = np.linalg.norm(got - ref[valid]) / np.linalg.norm(ref[valid])
  assert err < 1e-2, err  # bf16 output


def test_fused_attention_gradients_match_the_einsum_form_in_float32():
  q, k, v, mask, valid = inputs()
  cot = np.random.default_rng(1).normal(size=(B, T, H, DH)) * valid[:, :, None, None]
  scale = DH ** -0.5

  def loss(q, k, v):
    out = layers.attention(q, k, v, jnp.asarray(mask), scale=scale).astype(jnp.float32)
    return jnp.sum(out * jnp.asarray(cot, jnp.float32))

  grads = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
  # The reference: float32 gradients of the einsum form (another implementation) on the same bf16-rounded
  # inputs, on the CPU (no TF32 there).
  qb, kb, vb = (jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32) for x in (q, k, v))
  cpu = jax.devices("cpu")[0]
  ref_loss = lambda q, k, v: jnp.sum(layers.einsum_attention(q, k, v, jnp.asarray(mask), scale=scale) * cot)
  with jax.default_device(cpu):
    refs = jax.grad(ref_loss, argnums=(0, 1, 2))(*(jax.device_put(x, cpu) for x in (qb, kb, vb)))
  for name, g, r in zip("qkv", grads, refs):
    g, r = np.asarray(g, np.float64), np.asarray(r)
    err = np.linalg.norm(g - r) / np.linalg.norm(r)
    assert err < 2e-2, (name, err)
