"""GPT-2 family (gpt2 .. gpt2-xl, distilgpt2) against transformers' PyTorch GPT2LMHeadModel, fp32."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import msp_jax
from msp_jax import sampling
from msp_jax.errors import BackboneError
from msp_jax.models import gpt2

TOL = 1e-4
V, D, NPOS = 101, 64, 64

VARIANTS = {
    "gpt2": dict(),
    # n_inner, exact-erf GELU, an untied head, and the Megatron-style per-layer attention scaling
    # (reorder_and_upcast_attn only asks for fp32 logits, which we always compute).
    "n_inner_gelu_untied_layer_scaled": dict(
        n_inner=80, activation_function="gelu", tie_word_embeddings=False,
        scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
}


def tiny_hf_model(name, tmp_path_factory):
  cfg = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=NPOS, initializer_range=0.1,
                                bos_token_id=1, eos_token_id=2, **VARIANTS[name])
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
  with torch.no_grad():  # random (not zero / one) biases and norm scales, so a missed term would show
    for n, p in model.named_parameters():
      if n.endswith("bias") or ".ln_" in n:
        p.normal_(0.0, 0.1).add_(1.0 if ".ln_" in n and n.endswith("weight") else 0.0)
  folder = tmp_path_factory.mktemp(name)
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
  torch_model, folder = tiny_hf_model(request.param, tmp_path_factory)
  return torch_model, msp_jax.load_backbone(str(folder), dtype=jnp.float32).model


def left_padded_batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, V, size=(3, 12))
  mask = np.ones_like(ids)
  mask[1, :4] = 0  # row 1 has 4 left pads, row 2 has 7
  mask[2, :7] = 0
  ids[mask == 0] = 0
  return ids, mask


def torch_logits(model, ids, mask, **kw):
  position_ids = np.maximum(np.cumsum(mask, 1) - 1, 0)  # positions from the mask, as ours
  with torch.no_grad():
    out = model(input_ids=None if "inputs_embeds" in kw else torch.tensor(ids),
                attention_mask=torch.tensor(mask), position_ids=torch.tensor(position_ids), **kw)
  return out.logits.numpy()


def max_diff(a, b, where=None):
  d = np.abs(np.asarray(a) - np.asarray(b))
  d = d if where is None else d[where]
  print(f"max|diff| = {d.max():.2e}")
  return d.max()


def test_logits_match_transformers_on_plain_batch(pair):
  torch_model, model = pair
  ids = np.random.default_rng(3).integers(0, V, size=(2, 16))
  ours = model(jnp.asarray(ids))
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids)).logits.numpy()
  assert ours.dtype == jnp.float32 and ours.shape == (2, 16, V)
  assert max_diff(ours, ref) <= TOL


def test_logits_match_transformers_on_left_padded_batch(pair):
  torch_model, model = pair
  ids, mask = left_padded_batch()
  ours = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  assert max_diff(ours, torch_logits(torch_model, ids, mask), mask.astype(bool)) <= TOL


def test_padded_row_equals_row_alone(pair):
  _, model = pair
  ids, mask = left_padded_batch()
  batch = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  for row, pads in ((1, 4), (2, 7)):
    alone = model(jnp.asarray(ids[row:row + 1, pads:]))
    assert max_diff(batch[row, pads:], alone[0]) <= TOL


def test_embedded_prefix_equals_inputs_embeds(pair):
  torch_model, model = pair
  ids, mask = left_padded_batch()
  prefix = np.random.default_rng(1).normal(0, 0.5, size=(3, 5, D)).astype(np.float32)
  ours = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), embedded_prefix=jnp.asarray(prefix))
  # HF adds wpe to inputs_embeds, as we add positions to the prefix: both see [P][text] at 0..P+n-1.
  embeds = torch.cat([torch.tensor(prefix), torch_model.get_input_embeddings()(torch.tensor(ids))], 1)
  full_mask = np.concatenate([np.ones((3, 5), mask.dtype), mask], 1)
  ref = torch_logits(torch_model, None, full_mask, inputs_embeds=embeds)[:, 5:]
  assert ours.shape == (3, 12, V)
  assert max_diff(ours, ref, mask.astype(bool)) <= TOL


def test_masked_prefix_slots_are_skipped(pair):
  _, model = pair
  ids, mask = left_padded_batch()
  prefix = np.random.default_rng(6).normal(0, 0.5, size=(3, 5, D)).astype(np.float32)
  prefix_mask = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], bool)  # e.g. concat-mixer padding
  batch = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), embedded_prefix=jnp.asarray(prefix),
                           prefix_mask=jnp.asarray(prefix_mask)))
  for row, pads in ((1, 4), (2, 7)):
    alone = model(jnp.asarray(ids[row:row + 1, pads:]), embedded_prefix=jnp.asarray(prefix[row:row + 1, prefix_mask[row]]))
    assert max_diff(batch[row, pads:], alone[0]) <= TOL


def test_cached_greedy_equals_full_forward_argmax(pair):
  _, model = pair
  ids, mask = left_padded_batch()
  prefix = jnp.asarray(np.random.default_rng(2).normal(0, 0.5, size=(3, 4, D)), jnp.float32)
  step = jax.jit(lambda m, i, a, c: m(i, attention_mask=a, cache=c))  # model as an argument: no baked weights
  cache = model.init_cache(batch=3, max_len=4 + 12 + 8)
  logits, cache = jax.jit(lambda m, i, a, p, c: m(i, attention_mask=a, embedded_prefix=p, cache=c))(
      model, jnp.asarray(ids), jnp.asarray(mask), prefix, cache)
  tokens, cached = [], []
  for _ in range(8):  # prefill, then one token per call
    cached.append(np.asarray(logits[:, -1]))
    nxt = logits[:, -1].argmax(-1)[:, None]
    tokens.append(np.asarray(nxt))
    logits, cache = step(model, nxt, jnp.ones_like(nxt), cache)
  # One uncached forward over the final sequence: by causality its logits at position 11 + i are
  # those of a full forward of the first 12 + i tokens, i.e. what step i should have seen.
  seq = np.concatenate([ids, *tokens], 1)
  seq_mask = np.concatenate([mask, np.ones((3, 8), mask.dtype)], 1)
  full = np.asarray(model(jnp.asarray(seq), attention_mask=jnp.asarray(seq_mask), embedded_prefix=prefix))[:, 11:19]
  cached = np.stack(cached, 1)
  np.testing.assert_array_equal(full.argmax(-1), np.concatenate(tokens, 1))
  assert max_diff(cached, full) <= TOL


def test_greedy_equals_transformers_generate(pair):
  torch_model, model = pair
  ids, mask = left_padded_batch()
  with torch.no_grad():
    ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
  ours = sampling.greedy(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=8)  # the jitted while_loop
  np.testing.assert_array_equal(np.asarray(ours), ref[:, 12:].numpy())


def test_bare_gpt2model_checkpoint_without_transformer_prefix(tmp_path_factory):
  torch_model, _ = tiny_hf_model("gpt2", tmp_path_factory)
  folder = tmp_path_factory.mktemp("bare")
  torch_model.transformer.save_pretrained(folder, safe_serialization=True)  # names "h.0...", "wte.weight"
  model = msp_jax.load_backbone(str(folder), dtype=jnp.float32).model
  ids = np.random.default_rng(4).integers(0, V, size=(2, 10))
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids)).logits.numpy()
  assert max_diff(model(jnp.asarray(ids)), ref) <= TOL


def test_positions_past_the_table_reuse_its_last_row(tmp_path_factory):
  torch_model, folder = tiny_hf_model("gpt2", tmp_path_factory)
  model = msp_jax.load_backbone(str(folder), dtype=jnp.float32).model
  ids = np.random.default_rng(5).integers(0, V, size=(1, NPOS + 6))
  ours = np.asarray(model(jnp.asarray(ids)))
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids[:, :NPOS])).logits.numpy()
  assert max_diff(ours[:, :NPOS], ref) <= TOL  # causal: the in-table part is untouched
  assert np.isfinite(ours).all()


def test_bf16_compute_is_close_to_fp32(tmp_path_factory):
  _, folder = tiny_hf_model("gpt2", tmp_path_factory)
  ids, mask = left_padded_batch()
  fp32 = msp_jax.load_backbone(str(folder), dtype=jnp.float32).model
  bf16 = msp_jax.load_backbone(str(folder), dtype=jnp.bfloat16, param_dtype=jnp.float32).model
  assert bf16.embed[...].dtype == jnp.float32
  a = np.asarray(fp32(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  b = np.asarray(bf16(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert b.dtype == np.float32  # logits come back in fp32 for the loss
  valid = mask.astype(bool)
  scale = np.abs(a[valid]).max()
  print(f"bf16 max|diff| = {np.abs(a - b)[valid].max():.2e} (max|logit| {scale:.2e})")
  assert np.abs(a - b)[valid].max() <= 0.05 * scale


def test_unsupported_activation_is_a_one_line_error(tmp_path_factory):
  hf = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, activation_function="relu").to_dict()
  with pytest.raises(ValueError, match=r"activation_function='relu'.*supported: gelu_new") as e:
    gpt2.GPT2Config.from_hf(hf)
  assert "\n" not in str(e.value)
  # Through the loader: the same message, prefixed by the checkpoint folder.
  _, folder = tiny_hf_model("gpt2", tmp_path_factory)
  bad = tmp_path_factory.mktemp("relu")
  shutil.copytree(folder, bad, dirs_exist_ok=True)
  with open(bad / "config.json") as f:
    hf = json.load(f)
  hf["activation_function"] = "relu"
  with open(bad / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(BackboneError, match=r"activation_function='relu'") as e:
    msp_jax.load_backbone(str(bad), dtype=jnp.float32)
  assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(gpt2.PRESETS))
def test_presets_build_abstractly_with_partition_metadata(name):
  from flax import nnx
  cfg = gpt2.PRESETS[name]
  model = nnx.eval_shape(lambda: gpt2.GPT2(cfg, rngs=nnx.Rngs(0)))
  n_params = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var.get_value().ndim, path
    n_params += int(np.prod(var.get_value().shape))
  # The released sizes (tied head counted once): 124M, 355M, 774M, 1.56B, 82M.
  expected = {"gpt2": 124.4e6, "gpt2-medium": 354.8e6, "gpt2-large": 774.0e6, "gpt2-xl": 1557.6e6,
              "distilgpt2": 81.9e6}[name]
  assert abs(n_params - expected) / expected < 0.005, n_params
