"""T5 family (v1.0, v1.1 / Flan-T5) against transformers' PyTorch T5ForConditionalGeneration, fp32."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

import msp_jax
from msp_jax.errors import BackboneError
from msp_jax.models import t5

TOL = 1e-4
D, V = 64, 101

VARIANTS = {
    # T5 v1.0: ReLU, head tied to the embedding and fed hidden states scaled by d_model**-0.5.
    "t5_v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True, d_kv=16),
    # v1.1 as transformers v5 saves it: unscaled head, no lm_head.weight stored (v5 ties it to shared).
    "t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=16),
    # Flan-T5 as on the hub: own lm_head.weight, a v4 config (tie_word_embeddings false, no
    # scale_decoder_outputs); H * d_kv = 48 != d_model catches transposed projections.
    "flan_t5_untied_head": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=12, untie=True),
}


_BUILT = {}  # one model and folder per variant for the whole run; never edit a folder in place


def tiny_hf_model(name, tmp_path_factory):
  if name not in _BUILT:
    _BUILT[name] = build_tiny_hf_model(name, tmp_path_factory)
  return _BUILT[name]


def build_tiny_hf_model(name, tmp_path_factory):
  overrides = dict(VARIANTS[name])
  untie = overrides.pop("untie", False)
  cfg = transformers.T5Config(vocab_size=V, d_model=D, d_ff=128, num_layers=2, num_decoder_layers=3, num_heads=4,
                              relative_attention_num_buckets=8, relative_attention_max_distance=20,
                              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **overrides)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # random norm scales and a large position bias, so a missed term would show
    for n, p in model.named_parameters():
      if "layer_norm" in n:
        p.normal_(1.0, 0.1)
      elif "relative_attention_bias" in n:
        p.normal_(0.0, 1.0)
    if untie:
      model.lm_head.weight = torch.nn.Parameter(torch.randn(V, D) * 0.05)
  folder = tmp_path_factory.mktemp(name)
  model.save_pretrained(folder, safe_serialization=True)
  if untie:  # rewrite as a v4-era checkpoint: distinct head tensor, tie flag in the config
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "embed_tokens" not in k}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json")) as f:
      hf = json.load(f)
    hf.pop("scale_decoder_outputs", None)
    hf["tie_word_embeddings"] = False
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(hf, f)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()  # HF reads it as we do
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert not reloaded.config.scale_decoder_outputs
  return model, folder


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
  torch_model, folder = tiny_hf_model(request.param, tmp_path_factory)
  return torch_model, msp_jax.load_backbone(str(folder), dtype=jnp.float32).model


# Jitted with the model as an argument (its weights are inputs, never baked-in constants); module-level
# so every test of a variant reuses one compilation (an eager call re-compiles its layer scan each time).
forward = jax.jit(lambda m, ids, mask, dec, dec_mask=None, prefix=None: m(ids, mask, dec, dec_mask, embedded_prefix=prefix))
encode = jax.jit(lambda m, ids, mask, prefix=None: m.encode(ids, mask, embedded_prefix=prefix))
decode = jax.jit(lambda m, dec, enc, enc_mask: m.decode(dec, enc, enc_mask))
decode_step = jax.jit(lambda m, dec, enc, enc_mask, cache, kv: m.decode(dec, enc, enc_mask, cache=cache, cross_kv=kv))
CACHE_LEN = 10


def padded_batch():
  """Row 0 full, row 1 right-padded (T5's usual layout), row 2 left-padded."""
  rng = np.random.default_rng(0)
  ids = rng.integers(2, V, size=(3, 12))
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  mask[2, :5] = 0
  ids[mask == 0] = 0
  dec = np.concatenate([np.zeros((3, 1), ids.dtype), rng.integers(2, V, size=(3, 6))], 1)  # start token 0
  return ids, mask, dec


def t(x):
  return torch.tensor(np.asarray(x))


def torch_encoder(model, ids, mask, **kw):
  with torch.no_grad():
    return model.encoder(input_ids=None if "inputs_embeds" in kw else t(ids), attention_mask=t(mask),
                         **kw).last_hidden_state.numpy()


def torch_logits(model, ids, mask, dec, dec_mask=None, **kw):
  with torch.no_grad():
    return model(input_ids=None if "inputs_embeds" in kw else t(ids), attention_mask=t(mask),
                 decoder_input_ids=t(dec), decoder_attention_mask=None if dec_mask is None else t(dec_mask),
                 **kw).logits.numpy()


def report(name, diff):
  print(f"{name}: max|diff|={diff:.2e}")
  assert diff <= TOL, (name, diff)


def test_encoder_output_matches_transformers_on_padded_batch(pair):
  torch_model, model = pair
  ids, mask, _ = padded_batch()
  ours, ours_mask = encode(model, jnp.asarray(ids), jnp.asarray(mask))
  ref = torch_encoder(torch_model, ids, mask)
  assert (np.asarray(ours_mask) == mask.astype(bool)).all()
  report("encoder", np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())  # pad positions' outputs are never read


def test_decoder_logits_match_transformers(pair):
  torch_model, model = pair
  ids, mask, dec = padded_batch()
  dec_mask = np.ones_like(dec)
  ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec), jnp.asarray(dec_mask)))
  assert ours.shape == (3, 7, V) and ours.dtype == np.float32
  report("logits", np.abs(ours - torch_logits(torch_model, ids, mask, dec)).max())
  dec_mask[1, 4:] = 0  # right-padded targets
  ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec), jnp.asarray(dec_mask)))
  ref = torch_logits(torch_model, ids, mask, dec, dec_mask)
  report("logits, padded targets", np.abs(ours - ref)[dec_mask.astype(bool)].max())


def test_left_padded_row_with_prefix_equals_row_alone(pair):
  # Positions come from the mask, so the left pads between prefix and text do not stretch the
  # prefix-text distances (transformers would count them: its positions are raw indices).
  _, model = pair
  ids, mask, dec = padded_batch()
  prefix = jnp.asarray(np.random.default_rng(3).normal(0, 0.5, size=(3, 5, D)), jnp.float32)
  batch = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec), None, prefix))
  keep = mask[2].astype(bool)
  alone = np.asarray(forward(model, jnp.asarray(ids[2:, keep]), jnp.ones((1, keep.sum()), bool), jnp.asarray(dec[2:]),
                             None, prefix[2:]))
  report("left-padded row alone", np.abs(batch[2] - alone[0]).max())


def test_embedded_prefix_equals_inputs_embeds(pair):
  torch_model, model = pair
  ids, mask, dec = padded_batch()
  prefix = np.random.default_rng(1).normal(0, 0.5, size=(3, 5, D)).astype(np.float32)
  embeds = torch.cat([t(prefix), torch_model.get_input_embeddings()(t(ids))], 1)
  full_mask = np.concatenate([np.ones((3, 5), mask.dtype), mask], 1)
  enc, enc_mask = encode(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(prefix))
  assert enc.shape == (3, 17, D) and (np.asarray(enc_mask) == full_mask.astype(bool)).all()
  # Rows 0 (full) and 1 (right-padded) only: on row 2 transformers counts the left pads between
  # prefix and text as distance (its positions are raw indices); ours do not (previous test).
  rows = full_mask[:2].astype(bool)
  ref = torch_encoder(torch_model, None, full_mask, inputs_embeds=embeds)
  report("prefix encoder", np.abs(np.asarray(enc) - ref)[:2][rows].max())
  ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec), None, jnp.asarray(prefix)))
  ref = torch_logits(torch_model, None, full_mask, dec, inputs_embeds=embeds)
  report("prefix logits", np.abs(ours - ref)[:2].max())


def test_cached_decoding_equals_full_decoder_at_every_step(pair):
  _, model = pair
  ids, mask, dec = padded_batch()
  enc, enc_mask = encode(model, jnp.asarray(ids), jnp.asarray(mask))
  kv = model.cross_kv(enc)
  full = np.asarray(decode(model, jnp.asarray(dec), enc, enc_mask))
  cache = model.init_cache(3, CACHE_LEN)
  logits, cache = decode_step(model, jnp.asarray(dec[:, :3]), enc, enc_mask, cache, kv)  # prefill 3 tokens
  worst = np.abs(np.asarray(logits) - full[:, :3]).max()
  for i in range(3, dec.shape[1]):
    logits, cache = decode_step(model, jnp.asarray(dec[:, i:i + 1]), enc, enc_mask, cache, kv)
    worst = max(worst, np.abs(np.asarray(logits[:, 0]) - full[:, i]).max())
  report("cached steps", worst)
  # Without precomputed cross keys/values (recomputed from the encoder output): the same.
  logits, _ = model.decode(jnp.asarray(dec[:, :4]), enc, enc_mask, cache=model.init_cache(3, CACHE_LEN))
  report("cached, cross k/v recomputed", np.abs(np.asarray(logits) - full[:, :4]).max())


def test_greedy_equals_transformers_generate(pair):
  torch_model, model = pair
  ids, mask, _ = padded_batch()
  steps = 8
  with torch.no_grad():  # use_cache=False: transformers 5.24 sizes its cache by num_layers, not num_decoder_layers
    ref = torch_model.generate(t(ids), attention_mask=t(mask), max_new_tokens=steps, do_sample=False, num_beams=1,
                               eos_token_id=None, pad_token_id=0, use_cache=False).numpy()
  enc, enc_mask = encode(model, jnp.asarray(ids), jnp.asarray(mask))
  kv, cache = model.cross_kv(enc), model.init_cache(3, CACHE_LEN)
  token = jnp.full((3, 1), model.cfg.decoder_start_token_id, jnp.int32)
  out = [np.asarray(token)]
  for _ in range(steps):
    logits, cache = decode_step(model, token, enc, enc_mask, cache, kv)
    token = logits[:, -1:].argmax(-1).astype(jnp.int32)
    out.append(np.asarray(token))
  np.testing.assert_array_equal(np.concatenate(out, 1), ref)


def test_relative_position_buckets_match_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  rel = np.arange(-400, 401)
  for num_buckets, max_distance in ((8, 20), (32, 128), (32, 100)):
    for bidirectional in (True, False):
      ref = bucket(torch.tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
                   max_distance=max_distance).numpy()
      table = t5.relative_position_buckets(num_buckets, max_distance, bidirectional)
      np.testing.assert_array_equal(table[np.clip(rel, -max_distance, max_distance) + max_distance], ref)


def test_shift_right_matches_transformers(pair):
  torch_model, model = pair
  labels = np.array([[5, 7, 1, -100, -100], [9, 3, 4, 8, 1]])
  np.testing.assert_array_equal(np.asarray(t5.shift_right(labels, model.cfg)), torch_model._shift_right(t(labels)).numpy())


def edited_copy(name, tmp_path_factory, **fields):
  """A copy of variant `name`'s checkpoint folder with config fields changed."""
  folder = tmp_path_factory.mktemp(f"{name}_edited")
  shutil.copytree(tiny_hf_model(name, tmp_path_factory)[1], folder, dirs_exist_ok=True)
  with open(folder / "config.json") as f:
    hf = json.load(f)
  with open(folder / "config.json", "w") as f:
    json.dump({**hf, **fields}, f)
  return str(folder)


def test_bad_feed_forward_proj_raises(tmp_path_factory):
  good = dict(vocab_size=V, d_model=D, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
  with pytest.raises(ValueError) as e:
    t5.T5Config.from_hf({**good, "feed_forward_proj": "gated-silu"})
  for fragment in ("feed_forward_proj", "'gated-silu'", "'relu'", "'gated-gelu'"):
    assert fragment in str(e.value)
  folder = edited_copy("t5_v1_0", tmp_path_factory, feed_forward_proj="swish")
  with pytest.raises(BackboneError) as e:
    msp_jax.load_backbone(folder, dtype=jnp.float32)
  message = str(e.value)
  assert "\n" not in message and folder in message and "feed_forward_proj='swish'" in message, message


def test_tied_config_with_a_distinct_head_is_refused(tmp_path_factory):
  folder = edited_copy("flan_t5_untied_head", tmp_path_factory, tie_word_embeddings=True)
  with pytest.raises(BackboneError, match="lm_head.weight differs from shared.weight"):
    msp_jax.load_backbone(folder, dtype=jnp.float32)


def test_bf16_compute_is_close_to_fp32(tmp_path_factory):
  _, folder = tiny_hf_model("t5_v1_1", tmp_path_factory)
  ids, mask, dec = (jnp.asarray(a) for a in padded_batch())
  fp32 = msp_jax.load_backbone(str(folder), dtype=jnp.float32).model
  bf16 = msp_jax.load_backbone(str(folder), dtype=jnp.bfloat16, param_dtype=jnp.float32).model
  assert bf16.shared[...].dtype == jnp.float32
  a, b = np.asarray(forward(fp32, ids, mask, dec)), np.asarray(forward(bf16, ids, mask, dec))
  assert b.dtype == np.float32  # logits come back in fp32 for the loss
  assert np.abs(a - b).max() < 0.03 * np.abs(a).max()  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("preset", sorted(t5.PRESETS))
def test_presets_build_abstractly_with_partition_axes(preset):
  cfg = t5.PRESETS[preset]
  model = nnx.eval_shape(lambda: t5.T5(cfg, rngs=nnx.Rngs(0)))
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert ("lm_head",) in flat if not cfg.tie_word_embeddings else ("lm_head",) not in flat
  assert flat[("decoder", "layers", "xq")].get_value().shape == (cfg.num_decoder_layers, cfg.d_model, cfg.num_heads, cfg.d_kv)
  for path, var in flat.items():
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var.get_value().ndim, path
