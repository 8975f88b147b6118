"""Mixers: shapes, mask and permutation invariance, and a hand-computed case for each."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msp_jax import mixers

B, M, N, D = 3, 4, 5, 8


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  prompts = rng.normal(size=(B, M, N, D)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
  text = rng.normal(size=(B, D)).astype(np.float32)
  return prompts, mask, text


def make(name, **options):
  return mixers.make_mixer(name, D, rngs=nnx.Rngs(0), **options)


@pytest.mark.parametrize("name", sorted(mixers.MIXERS))
def test_shapes(name):
  prompts, mask, text = inputs()
  out, out_mask = make(name)(jnp.asarray(prompts), jnp.asarray(mask), jnp.asarray(text))
  n_out = M * N if name == "concat" else N
  assert out.shape == (B, n_out, D) and out_mask.shape == (B, n_out) and out_mask.dtype == bool


@pytest.mark.parametrize("name", sorted(mixers.MIXERS))
def test_padding_slots_never_change_the_output(name):
  prompts, mask, text = inputs()
  mixer = make(name)
  garbage = np.where(mask[:, :, None, None], prompts, 1e3 * np.random.default_rng(1).normal(size=prompts.shape))
  a, a_mask = mixer(jnp.asarray(prompts), jnp.asarray(mask), jnp.asarray(text))
  b, b_mask = mixer(jnp.asarray(garbage.astype(np.float32)), jnp.asarray(mask), jnp.asarray(text))
  visible = np.asarray(a_mask)[..., None]
  np.testing.assert_array_equal(a_mask, b_mask)
  np.testing.assert_allclose(np.where(visible, a, 0), np.where(visible, b, 0), atol=1e-5)


@pytest.mark.parametrize("name", ["pooling", "attention", "bottleneck"])
def test_permutation_invariance(name):
  prompts, mask, text = inputs()
  mixer = make(name)
  row = 2  # all four slots real
  perm = np.array([2, 0, 3, 1])
  a, _ = mixer(jnp.asarray(prompts[row:]), jnp.asarray(mask[row:]), jnp.asarray(text[row:]))
  b, _ = mixer(jnp.asarray(prompts[row:, perm]), jnp.asarray(mask[row:]), jnp.asarray(text[row:]))
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_concat_by_hand():
  prompts = np.arange(2 * 1 * 2, dtype=np.float32).reshape(1, 2, 1, 2)  # two attributes, one token each
  out, out_mask = make("concat")(jnp.asarray(prompts), jnp.asarray([[True, False]]))
  np.testing.assert_array_equal(out, [[[0, 1], [2, 3]]])
  np.testing.assert_array_equal(out_mask, [[True, False]])


def test_pooling_by_hand():
  prompts = np.array([[[[1.0, 2.0]], [[3.0, 6.0]], [[100.0, 100.0]]]], np.float32)
  out, _ = make("pooling")(jnp.asarray(prompts), jnp.asarray([[True, True, False]]))
  np.testing.assert_allclose(out, [[[2.0, 4.0]]])


def attention_by_hand(keys, values, q, temperature):
  scores = keys @ q / (math.sqrt(len(q)) * temperature)
  alpha = np.exp(scores - scores.max())
  alpha /= alpha.sum()
  return (alpha[:, None, None] * values).sum(0), alpha


def test_attention_by_hand_and_softmax_over_attributes():
  mixer = mixers.Attention(2, rngs=nnx.Rngs(0), temperature=0.5)
  mixer.query[...] = jnp.eye(2)
  prompts = np.array([[[[2.0, 0.0]], [[0.0, 2.0]]]], np.float32)  # [1, 2 attributes, 1 token, 2]
  text = np.array([[1.0, 0.0]], np.float32)
  out, _ = mixer(jnp.asarray(prompts), jnp.asarray([[True, True]]), jnp.asarray(text))
  want, alpha = attention_by_hand(prompts[0, :, 0], prompts[0], text[0], 0.5)
  np.testing.assert_allclose(out[0], want, rtol=1e-5)
  assert abs(alpha[0] - 1 / (1 + math.exp(-2 / math.sqrt(2) / 0.5))) < 1e-6
  # The original's softmax over the embedding axis reduced to a plain sum; ours depends on the query.
  mixer.query[...] = -jnp.eye(2)
  flipped, _ = mixer(jnp.asarray(prompts), jnp.asarray([[True, True]]), jnp.asarray(text))
  assert np.abs(np.asarray(flipped) - np.asarray(out)).max() > 0.5
  np.testing.assert_allclose(flipped[0, 0], want[0, ::-1], rtol=1e-5)


def test_bottleneck_by_hand():
  mixer = mixers.Bottleneck(2, rngs=nnx.Rngs(0), hidden=3)
  rng = np.random.default_rng(0)
  q, down, up = np.eye(2, dtype=np.float32), rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)
  mixer.query[...], mixer.down[...], mixer.up[...] = jnp.asarray(q), jnp.asarray(down), jnp.asarray(up)
  prompts = rng.normal(size=(1, 3, 2, 2)).astype(np.float32)
  text = rng.normal(size=(1, 2)).astype(np.float32)
  out, _ = mixer(jnp.asarray(prompts), jnp.asarray([[True, True, True]]), jnp.asarray(text))
  k = prompts[0].mean(1)
  silu = lambda x: x / (1 + np.exp(-x))
  keys = k + silu(k @ down) @ up
  want, _ = attention_by_hand(keys, prompts[0], text[0], 1.0)
  np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-6)


def test_cnn_by_hand():
  mixer = mixers.CNN(1, rngs=nnx.Rngs(0), kernel_size=2)
  mixer.kernel[...] = jnp.asarray([[[2.0]], [[3.0]]])  # out[j] = 2 x[j] + 3 x[j+1] + bias
  mixer.bias[...] = jnp.asarray([0.5])
  x = np.array([1.0, 10.0, 100.0, 999.0], np.float32)  # the last slot is padding
  prompts = x.reshape(1, 4, 1, 1)
  out, _ = mixer(jnp.asarray(prompts), jnp.asarray([[True, True, True, False]]))
  rows = [2 * 1 + 3 * 10 + 0.5, 2 * 10 + 3 * 100 + 0.5, 2 * 100 + 3 * 0 + 0.5]  # padding seen as zero
  np.testing.assert_allclose(out[0, 0, 0], np.mean(rows), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(mixers.MIXERS))
def test_row_without_attributes_is_finite_with_finite_gradients(name):
  prompts, _, text = inputs()
  mask = np.zeros((B, M), bool)
  mixer = make(name)
  graphdef, params, rest = nnx.split(mixer, mixers.PromptParam, ...)

  def loss(params, prompts):
    out, _ = nnx.merge(graphdef, params, rest)(prompts, jnp.asarray(mask), jnp.asarray(text))
    return jnp.sum(out ** 2)

  grads = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(prompts))
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", sorted(mixers.MIXERS))
def test_row_without_attributes_sees_the_instruction_prompt_alone(name):
  """Its mixed tokens are masked, so the backbone's logits for it equal an independent call whose only
  prefix is the instruction prompt (no mixer involved)."""
  from test_training_step import tiny_batch, tiny_model
  model = tiny_model("llama", name)
  batch = tiny_batch(batch=3)
  batch["attribute_mask"][1] = False  # row 1: no attribute in any set
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  prefix, prefix_mask = model.prefix(batch)
  n_instruction = model.prompts.instruction.shape[0]
  assert bool(prefix_mask[1, :n_instruction].all()) and not bool(prefix_mask[1, n_instruction:].any())
  assert bool(prefix_mask[0].any())
  logits = model.backbone(batch["input_ids"], batch["attention_mask"], embedded_prefix=prefix, prefix_mask=prefix_mask)
  alone = model.backbone(batch["input_ids"][1:2], batch["attention_mask"][1:2],
                         embedded_prefix=model.prompts.instruction[...][None])
  np.testing.assert_allclose(logits[1], alone[0], atol=1e-5)


def test_unknown_mixer_lists_the_valid_ones():
  with pytest.raises(ValueError, match="'mean' is not supported; valid: concat, pooling, attention, bottleneck, cnn"):
    mixers.make_mixer("mean", D, rngs=nnx.Rngs(0))


def test_plain_prompt_tuning_has_no_attribute_prompts():
  from msp_jax import prompts
  instruction = np.arange(12, dtype=np.float32).reshape(3, 4)
  soft = prompts.SoftPrompts(instruction, {"intents": np.ones((5, 2, 4), np.float32)}, "none", rngs=nnx.Rngs(0))
  ids, mask = jnp.zeros((2, 1, 3), jnp.int32), jnp.array([[[1, 1, 0]], [[0, 0, 0]]], bool)
  prefix, prefix_mask = soft(ids, mask, jnp.zeros((2, 4)))
  np.testing.assert_array_equal(prefix, np.broadcast_to(instruction, (2, 3, 4)))
  assert prefix_mask.all() and prefix_mask.shape == (2, 3)
  leaves = jax.tree.leaves(nnx.state(soft, mixers.PromptParam))
  assert [x.shape for x in leaves] == [(3, 4)]  # only the instruction is trainable
