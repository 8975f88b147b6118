"""Llama family (Llama 2/3, SmolLM2, Qwen2, Mistral) against transformers' PyTorch models, fp32."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import msp_jax

TOL = 1e-4

VARIANTS = {
    # name: (transformers config class, overrides)
    "llama_gqa_untied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "smollm2_tied": (transformers.LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=100000.0)),
    "llama3_rope_scaling": (transformers.LlamaConfig, dict(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    "llama_attention_bias": (transformers.LlamaConfig, dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "qwen2_qkv_bias": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral_gqa": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
}


def tiny_hf_model(name, tmp_path_factory):
  config_class, overrides = VARIANTS[name]
  cfg = config_class(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, **overrides)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
  with torch.no_grad():  # random (not zero) biases and norm scales, so a missed term would show
    for n, p in model.named_parameters():
      if n.endswith("bias") or "norm" in n:
        p.normal_(0.0, 0.1).add_(1.0 if "norm" in n else 0.0)
  folder = tmp_path_factory.mktemp(name)
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
  torch_model, folder = tiny_hf_model(request.param, tmp_path_factory)
  return torch_model, msp_jax.load_backbone(str(folder), dtype=jnp.float32).model


def left_padded_batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 101, size=(3, 12))
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


def test_logits_match_transformers_on_left_padded_batch(pair):
  torch_model, model = pair
  ids, mask = left_padded_batch()
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  ref = torch_logits(torch_model, ids, mask)
  valid = mask.astype(bool)
  assert np.abs(ours - ref)[valid].max() <= TOL


def test_padded_row_equals_row_alone(pair):
  torch_model, model = pair
  ids, mask = left_padded_batch()
  batch = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  row = ids[2:3, 7:]
  alone = np.asarray(model(jnp.asarray(row)))
  with torch.no_grad():
    ref = torch_model(torch.tensor(row)).logits.numpy()
  assert np.abs(batch[2, 7:] - alone[0]).max() <= TOL
  assert np.abs(alone - ref).max() <= TOL


def test_embedded_prefix_equals_inputs_embeds(pair):
  torch_model, model = pair
  ids, mask = left_padded_batch()
  prefix = np.random.default_rng(1).normal(0, 0.5, size=(3, 5, 64)).astype(np.float32)
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), embedded_prefix=jnp.asarray(prefix)))
  embeds = torch.cat([torch.tensor(prefix), torch_model.get_input_embeddings()(torch.tensor(ids))], 1)
  full_mask = np.concatenate([np.ones((3, 5), mask.dtype), mask], 1)
  ref = torch_logits(torch_model, None, full_mask, inputs_embeds=embeds)[:, 5:]
  assert ours.shape == (3, 12, 101)
  assert np.abs(ours - ref)[mask.astype(bool)].max() <= TOL


def test_cached_greedy_equals_full_forward_argmax(pair):
  torch_model, model = pair
  ids, mask = left_padded_batch()
  prefix = jnp.asarray(np.random.default_rng(2).normal(0, 0.5, size=(3, 4, 64)), jnp.float32)
  step = jax.jit(lambda m, i, a, c: m(i, attention_mask=a, cache=c))  # model as an argument: no baked weights
  cache = model.init_cache(batch=3, max_len=4 + 12 + 8)
  logits, cache = jax.jit(lambda m, i, a, p, c: m(i, attention_mask=a, embedded_prefix=p, cache=c))(
      model, jnp.asarray(ids), jnp.asarray(mask), prefix, cache)
  seq, seq_mask = jnp.asarray(ids), jnp.asarray(mask)
  for _ in range(8):
    full = model(seq, attention_mask=seq_mask, embedded_prefix=prefix)
    assert np.abs(np.asarray(full[:, -1]) - np.asarray(logits[:, -1])).max() <= TOL
    nxt = logits[:, -1].argmax(-1)[:, None]
    assert (nxt == full[:, -1].argmax(-1)[:, None]).all()
    seq, seq_mask = jnp.concatenate([seq, nxt], 1), jnp.concatenate([seq_mask, jnp.ones_like(nxt)], 1)
    logits, cache = step(model, nxt, jnp.ones_like(nxt), cache)


def test_a_prefill_on_a_fresh_cache_scores_its_own_keys_only(pair):
  """A fresh cache holds no key: the prefill's attention logits span its own 12 keys, not the cache's 19
  slots (masked slots cost work, and XLA spent seconds constant-folding them at compile time)."""
  _, model = pair
  ids, mask = left_padded_batch()
  cache = model.init_cache(batch=3, max_len=12 + 7)
  prefill = jax.jit(lambda m, i, a, c: m(i, attention_mask=a, cache=c))
  hlo = prefill.lower(model, jnp.asarray(ids), jnp.asarray(mask), cache).as_text()
  assert cache.empty and re.search(r"x12x12xf32>", hlo) and not re.search(r"x12x19xf32>", hlo)
  _, cache = prefill(model, jnp.asarray(ids), jnp.asarray(mask), cache)
  assert not cache.empty  # the next call attends over the cache's slots too (test above: the same logits)


def test_greedy_equals_transformers_generate(pair):
  torch_model, model = pair
  prompt = np.array([[5, 17, 42, 9, 77, 3]])
  with torch.no_grad():
    ref = torch_model.generate(torch.tensor(prompt), attention_mask=torch.ones(1, 6, dtype=torch.long),
                               max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
  cache = model.init_cache(1, 16)
  logits, cache = model(jnp.asarray(prompt), cache=cache)
  out = []
  for _ in range(10):
    nxt = logits[:, -1].argmax(-1)[:, None]
    out.append(int(nxt[0, 0]))
    logits, cache = model(nxt, cache=cache)
  assert out == ref[0, 6:].tolist()


def test_bf16_compute_is_close_to_fp32(tmp_path_factory):
  _, folder = tiny_hf_model("llama_gqa_untied", tmp_path_factory)
  ids, mask = left_padded_batch()
  fp32 = msp_jax.load_backbone(str(folder), dtype=jnp.float32).model
  bf16 = msp_jax.load_backbone(str(folder), dtype=jnp.bfloat16, param_dtype=jnp.float32).model
  assert bf16.embed[...].dtype == jnp.float32
  a = np.asarray(fp32(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  b = np.asarray(bf16(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert b.dtype == np.float32  # logits come back in fp32 for the loss
  assert np.abs(a - b)[mask.astype(bool)].max() < 0.1


def test_partition_metadata_names_every_axis():
  from flax import nnx
  from msp_jax.models import llama
  model = nnx.eval_shape(lambda: llama.Llama(llama.PRESETS["smollm2-135m"], rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var.get_value().ndim, path
