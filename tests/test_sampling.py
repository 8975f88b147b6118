"""The jitted sampler against independent references: transformers' logits processors and
`generate(num_beams=...)` on tiny random models with the same weights, and full forwards."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.generation import logits_process as hf

import test_llama
import test_t5
from msp_jax import sampling
from msp_jax.sampling import DecodeConfig

PAD = 100  # not 0: transformers' beam search fills with EOS when pad_token_id is 0 (falsy)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  import msp_jax
  torch_model, _ = test_llama.tiny_hf_model("llama_gqa_untied", tmp_path_factory)
  torch_model = copy.deepcopy(torch_model)
  with torch.no_grad():  # larger weights than the default init: varied continuations, beams that differ from greedy
    for name, p in torch_model.named_parameters():
      if "proj" in name or "embed" in name or "lm_head" in name:
        p.normal_(0.0, 0.3)
  folder = tmp_path_factory.mktemp("varied_llama")
  torch_model.save_pretrained(folder, safe_serialization=True)
  return torch_model, msp_jax.load_backbone(str(folder), dtype=jnp.float32).model


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
  import msp_jax
  torch_model, folder = test_t5.tiny_hf_model("t5_v1_1", tmp_path_factory)
  return torch_model, msp_jax.load_backbone(str(folder), dtype=jnp.float32).model


def random_logits(seed=0, shape=(4, 101)):
  return np.random.default_rng(seed).normal(0, 3, shape).astype(np.float32)


# --- logits processors vs transformers ------------------------------------------------------------

@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_transformers(penalty):
  logits = random_logits()
  ids = np.random.default_rng(1).integers(0, 101, (4, 9))
  ref = hf.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(logits)).numpy()
  seen = sampling.seen_tokens(jnp.asarray(ids), jnp.ones(ids.shape, bool), 101)
  np.testing.assert_allclose(sampling.apply_repetition_penalty(jnp.asarray(logits), seen, penalty), ref, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_equals_transformers(k):
  logits = random_logits(2)
  ref = hf.TopKLogitsWarper(top_k=k)(None, torch.tensor(logits)).numpy()
  np.testing.assert_array_equal(np.asarray(sampling.apply_top_k(jnp.asarray(logits), k)), ref)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_equals_transformers(p):
  logits = random_logits(3)
  ref = hf.TopPLogitsWarper(top_p=p)(None, torch.tensor(logits)).numpy()
  ours = np.asarray(sampling.apply_top_p(jnp.asarray(logits), p))
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
  np.testing.assert_array_equal(ours[~np.isinf(ours)], ref[~np.isinf(ref)])


@pytest.mark.parametrize("p", [0.8, 0.95])
def test_top_p_equals_transformers_at_a_real_vocabulary_size(p):
  """SmolLM2's 49,152 tokens, peaked and flat rows: the bisection's threshold drops exactly HF's tokens."""
  rng = np.random.default_rng(7)
  logits = (rng.normal(size=(5, 49152)) * np.array([[0.5], [1.0], [2.0], [4.0], [6.0]])).astype(np.float32)
  ref = hf.TopPLogitsWarper(top_p=p)(None, torch.tensor(logits)).numpy()
  ours = np.asarray(sampling.apply_top_p(jnp.asarray(logits), p))
  assert 1 < (~np.isinf(ref)).sum(-1).min() and (~np.isinf(ref)).sum(-1).max() < 49152  # the cut is inside every row
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))


def chi_square_ok(tokens, probs):
  """Frequencies of `tokens` match `probs` (chi-square within ~5 sigma) and no zero-probability token came up."""
  counts = np.bincount(tokens, minlength=len(probs))
  live = probs > 0
  expected = probs[live] * len(tokens)
  chi2 = ((counts[live] - expected) ** 2 / expected).sum()
  dof = live.sum() - 1
  return counts[~live].sum() == 0 and chi2 <= dof + 5 * np.sqrt(2 * dof), (counts[~live].sum(), chi2, dof)


def test_sample_draws_from_the_softmax_and_never_a_masked_token():
  """Inverse-CDF sampling: frequencies over 40,000 draws match softmax(scores) (chi-square), -inf never
  comes up, across block boundaries (vocabulary 1,000 in blocks of 64) and in a one-token row."""
  rng = np.random.default_rng(11)
  scores = rng.normal(size=(2, 1000)).astype(np.float32) * 1.5
  scores[0, rng.choice(1000, 700, replace=False)] = -np.inf
  scores[1, :] = -np.inf
  scores[1, 999] = 0.0  # the last token of a partial last block
  draw = jax.jit(jax.vmap(lambda k: sampling.sample(k, jnp.asarray(scores), block=64)))
  tokens = np.asarray(draw(jax.random.split(jax.random.key(0), 40000)))  # [draws, 2]
  assert (tokens[:, 1] == 999).all()
  probs = np.exp(scores[0] - scores[0].max())
  probs /= probs.sum()
  ok, detail = chi_square_ok(tokens[:, 0], probs)
  assert ok, detail


@pytest.mark.parametrize("p, candidates", [(0.9, None), (0.5, 1), (0.3, None)])
def test_sample_top_p_draws_from_transformers_nucleus(p, candidates):
  """Rejection top-p = softmax over HF's `TopPLogitsWarper` output, by chi-square over 40,000 draws per row, a
  peaked and a flat row: with the default candidate count (0.9), with one candidate so that about half the
  draws take the exact fallback (0.5), and where the nucleus is too narrow for rejection (0.3: the cut)."""
  rng = np.random.default_rng(13)
  scores = (rng.normal(size=(2, 1000)) * np.array([[2.0], [0.5]])).astype(np.float32)
  nucleus = hf.TopPLogitsWarper(top_p=p)(None, torch.tensor(scores)).numpy()
  probs = np.exp(nucleus - nucleus.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  draw = jax.jit(jax.vmap(lambda k: sampling.sample_top_p(k, jnp.asarray(scores), p, candidates=candidates, block=64)))
  tokens = np.asarray(draw(jax.random.split(jax.random.key(1), 40000)))  # [draws, 2]
  for row in range(2):
    ok, detail = chi_square_ok(tokens[:, row], probs[row])
    assert ok, (p, row, detail)


def test_sample_top_p_at_one_is_the_plain_draw():
  scores = jnp.asarray(random_logits(4))
  key = jax.random.key(3)
  np.testing.assert_array_equal(np.asarray(sampling.sample_top_p(key, scores, 1.0)), np.asarray(sampling.sample(key, scores)))


def test_processor_chain_equals_transformers_in_its_order():
  logits, ids = random_logits(4), np.random.default_rng(5).integers(0, 101, (4, 7))
  chain = hf.LogitsProcessorList([hf.RepetitionPenaltyLogitsProcessor(1.2), hf.TemperatureLogitsWarper(0.7),
                                  hf.TopKLogitsWarper(20), hf.TopPLogitsWarper(0.8)])
  ref = chain(torch.tensor(ids), torch.tensor(logits)).numpy()
  config = DecodeConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.2)
  ours = np.asarray(sampling.process(jnp.asarray(logits), sampling.seen_tokens(jnp.asarray(ids), jnp.ones(ids.shape), 101),
                                     config))
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
  np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)


# --- the loop -----------------------------------------------------------------------------------

def left_padded(seed=0, rows=3, length=8):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 100, size=(rows, length)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[1, :3] = False
  if rows > 2:
    mask[2, :5] = False
  ids[~mask] = PAD
  return ids, mask


full_forward = jax.jit(lambda m, ids, mask, prefix: m(ids, mask, embedded_prefix=prefix))


def test_greedy_equals_argmax_of_full_forwards_with_a_prefix(llama):
  _, model = llama
  ids, mask = left_padded()
  prefix = jax.random.normal(jax.random.key(0), (3, 4, model.cfg.hidden_size)) * 0.1
  new = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=6, pad_id=PAD), embedded_prefix=prefix))
  seq, seq_mask = ids, mask
  for i in range(6):
    logits = full_forward(model, jnp.asarray(seq), jnp.asarray(seq_mask), prefix)
    token = np.asarray(logits[:, -1].argmax(-1))
    np.testing.assert_array_equal(new[:, i], token)
    seq, seq_mask = np.concatenate([seq, token[:, None]], 1), np.concatenate([seq_mask, np.ones((3, 1), bool)], 1)


def test_prefill_computes_the_last_positions_logits_only(llama):
  """Generation reads the prefill's last column; [B, T, V] logits (2.8 GB at the grid's 64 x 224) are waste."""
  _, model = llama
  ids, mask = left_padded(rows=3, length=8)
  graph, state = nnx.split(model)
  run = jax.jit(lambda state, ids, mask: sampling.generate(nnx.merge(graph, state), ids, mask,
                                                          DecodeConfig(max_new_tokens=2, pad_id=PAD)))
  hlo = run.lower(state, ids, mask).as_text()
  v = model.cfg.vocab_size
  assert f"3x1x{v}xf32" in hlo and f"3x8x{v}xf32" not in hlo


def test_sampled_tokens_stay_inside_top_k_and_top_p(llama):
  _, model = llama
  ids, mask = left_padded(1, rows=4)
  for config, allowed in [(DecodeConfig(max_new_tokens=5, do_sample=True, top_k=3, pad_id=PAD), "k"),
                          (DecodeConfig(max_new_tokens=5, do_sample=True, top_p=0.6, temperature=1.5, pad_id=PAD), "p")]:
    for seed in range(4):
      new = np.asarray(sampling.generate(model, ids, mask, config, rng=jax.random.key(seed)))
      logits = np.asarray(full_forward(model, jnp.asarray(np.concatenate([ids, new], 1)),
                                       jnp.asarray(np.concatenate([mask, np.ones_like(new, bool)], 1)), None))
      for i in range(5):
        step = logits[:, ids.shape[1] - 1 + i] / config.temperature
        order = np.argsort(-step, axis=-1)
        if allowed == "k":
          legal = order[:, :3]
        else:  # the nucleus, by hand: most likely tokens until their probability reaches p
          probs = np.exp(step - step.max(-1, keepdims=True))
          probs /= probs.sum(-1, keepdims=True)
          cum = np.cumsum(np.take_along_axis(probs, order, -1), -1)
          legal = [order[r, :np.searchsorted(cum[r], 0.6) + 1] for r in range(4)]
        for r in range(4):
          assert new[r, i] in legal[r], (config, seed, r, i)


def test_rows_that_end_emit_only_padding(llama):
  _, model = llama
  ids, mask = left_padded(2, rows=4)
  free = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=8, pad_id=PAD)))
  eos = int(free[0, 2])  # row 0 (at least) ends at step 2
  new = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=8, eos_ids=(eos,), pad_id=PAD)))
  ended = 0
  for row in new:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      ended += 1
      assert (row[hits[0] + 1:] == PAD).all()
  assert ended >= 1 and (new[0, 3:] == PAD).all()
  stop = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=8, stop_ids=(eos,), pad_id=PAD)))
  np.testing.assert_array_equal(stop, new)  # a stop token ends a row exactly as EOS does


def test_num_return_sequences_copies_rows_in_order(llama):
  _, model = llama
  ids, mask = left_padded()
  one = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=4)))
  two = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=4, num_return_sequences=2)))
  np.testing.assert_array_equal(two, np.repeat(one, 2, axis=0))
  sampled = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=6, do_sample=True,
                                                                           num_return_sequences=3), rng=jax.random.key(1)))
  assert sampled.shape == (9, 6) and len({tuple(r) for r in sampled[:3]}) > 1


def test_per_row_keys_make_a_row_independent_of_its_batch(llama):
  """With one key per row, a row samples the same tokens whatever rows share its batch, in whatever order;
  a wrong number of keys is refused."""
  _, model = llama
  ids, mask = left_padded(1, rows=4)
  config = DecodeConfig(max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.5, pad_id=PAD)
  keys = jax.random.split(jax.random.key(7), 4)
  whole = np.asarray(sampling.generate(model, ids, mask, config, rng=keys))
  order = np.array([3, 1, 0, 2])
  shuffled = np.asarray(sampling.generate(model, ids[order], mask[order], config, rng=keys[order]))
  np.testing.assert_array_equal(shuffled, whole[order])
  alone = np.asarray(sampling.generate(model, ids[2:3], mask[2:3], config, rng=keys[2:3]))
  np.testing.assert_array_equal(alone, whole[2:3])
  assert len({tuple(r) for r in whole}) > 1
  with pytest.raises(ValueError, match="3 keys for 4 rows"):
    sampling.generate(model, ids, mask, config, rng=keys[:3])


@pytest.mark.parametrize("kind, sample", [("llama", False), ("llama", True), ("t5", True)],
                         ids=["greedy", "sampled", "t5-sampled"])
def test_shrinking_the_batch_as_rows_end_keeps_every_rows_tokens(kind, sample, request, monkeypatch):
  """shrink_every: once the running rows fit in half the batch they go on without the ended ones (8 rows ->
  4 here); every row's tokens equal the one-loop decode's, greedy with a repetition penalty and a prefix, and
  sampled, decoder-only and T5 (its encoder output and cross-attention cache move with the rows). The EOS ids
  are chosen from a free run so that most rows end within two steps and row 7 never."""
  _, model = request.getfixturevalue(kind)
  ids, mask = left_padded(3, rows=8)
  prefix = jax.random.normal(jax.random.key(1), (8, 4, model.cfg.d_model if kind == "t5" else model.cfg.hidden_size)) * 0.1
  base = dict(max_new_tokens=12, pad_id=PAD, repetition_penalty=1.3, do_sample=sample,
              **(dict(top_p=0.9, temperature=1.5) if sample else {}))
  run = lambda config, **kw: np.asarray(sampling.generate(model, ids, mask, config, rng=jax.random.key(5),
                                                          embedded_prefix=prefix, **kw))
  free = run(DecodeConfig(**base))
  eos = tuple(sorted({int(t) for t in free[:7, :2].ravel()} - set(free[7].tolist())))
  ends = [next((i for i, t in enumerate(row) if t in eos), None) for row in free]
  assert sum(e is not None and e <= 1 for e in ends) >= 4 and ends[7] is None, (ends, eos)  # the case this test needs
  config = DecodeConfig(**base, eos_ids=eos)
  sizes, advance = [], sampling._continue_sampling

  def spy(model, carry, *args, **kw):
    sizes.append(carry[4].shape[0])
    return advance(model, carry, *args, **kw)
  monkeypatch.setattr(sampling, "_continue_sampling", spy)
  np.testing.assert_array_equal(run(config, shrink_every=2), run(config))
  assert sizes[0] == 8 and sizes[-1] == 4, sizes


def test_one_compilation_per_config_and_shape(llama):
  _, model = llama
  ids, mask = left_padded()
  config = DecodeConfig(max_new_tokens=3, do_sample=True, top_p=0.9)
  before = sampling.compilations()
  for seed in range(3):
    sampling.generate(model, ids, mask, config, rng=jax.random.key(seed))
  assert sampling.compilations() == before + 1
  sampling.generate(model, ids[:2], mask[:2], config, rng=jax.random.key(0))
  assert sampling.compilations() == before + 2


def test_bad_configs_are_refused():
  for kw in [dict(temperature=0.0), dict(top_p=0.0), dict(num_beams=2, do_sample=True), dict(max_new_tokens=0),
             dict(num_beams=2, num_return_sequences=3), dict(early_stopping="sometimes")]:
    with pytest.raises(ValueError, match="DecodeConfig"):
      DecodeConfig(**kw)


# --- beam search vs transformers ---------------------------------------------------------------------

BEAMS = [dict(num_beams=3), dict(num_beams=4, length_penalty=0.5, early_stopping=True),
         dict(num_beams=2, length_penalty=2.0, early_stopping="never"),
         dict(num_beams=3, num_return_sequences=2, repetition_penalty=1.5)]


def reference_beams(torch_model, ids, mask, steps, eos, kw, **extra):
  with torch.no_grad():
    out = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                               max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=PAD, **kw,
                               **extra).numpy()
  return out


def pad_to(a, n):
  return np.concatenate([a, np.full((a.shape[0], n - a.shape[1]), PAD, a.dtype)], 1)


def test_a_penalty_on_the_new_tokens_only_equals_transformers_prompt_ignore_length(llama):
  """`penalize_prompt=False` (the label writer's greedy decode) penalises only what the call wrote:
  transformers' RepetitionPenaltyLogitsProcessor with the whole (padded) prompt ignored."""
  torch_model, model = llama
  ids, mask = left_padded(3, rows=3, length=8)
  steps, penalty = 10, 3.0
  processor = hf.LogitsProcessorList([hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=ids.shape[1])])
  ref = reference_beams(torch_model, ids, mask, steps, -1, {}, logits_processor=processor)[:, ids.shape[1]:]
  ours = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=steps, repetition_penalty=penalty,
                                                                      penalize_prompt=False, pad_id=PAD)))
  np.testing.assert_array_equal(ours, ref)
  with_prompt = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=steps, repetition_penalty=penalty,
                                                                             pad_id=PAD)))
  assert (with_prompt != ours).any()  # the prompt's tokens make a difference here


@pytest.mark.parametrize("kw", BEAMS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_beam_search_equals_transformers_decoder_only(llama, kw):
  torch_model, model = llama
  ids, mask = left_padded(3, rows=3, length=8)
  steps = 7
  eos = int(np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=3)))[0, 2])  # some beams end
  ref = pad_to(reference_beams(torch_model, ids, mask, steps, eos, kw)[:, ids.shape[1]:], steps)
  ours = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=steps, eos_ids=(eos,), pad_id=PAD, **kw)))
  np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("kw", BEAMS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_stop_tokens_end_beams_as_transformers_eos_list(llama, kw):
  """Stop tokens end beams exactly as extra EOS ids do in transformers (`eos_token_id=[eos, *stops]`),
  including how many candidates a step keeps so that k beams can go on running."""
  torch_model, model = llama
  ids, mask = left_padded(3, rows=3, length=8)
  steps = 7
  first = np.asarray(full_forward(model, jnp.asarray(ids), jnp.asarray(mask), None))[:, -1]
  # Each row's 3 likeliest first tokens end a row: more candidates end than k, so how many a step
  # keeps decides which beams run on.
  enders = list(dict.fromkeys(int(t) for t in np.argsort(-first, -1)[:, :3].ravel()))
  eos, stops = enders[0], tuple(enders[1:])
  ref = pad_to(reference_beams(torch_model, ids, mask, steps, [eos, *stops], kw)[:, ids.shape[1]:], steps)
  ours = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=steps, eos_ids=(eos,),
                                                                     stop_ids=stops, pad_id=PAD, **kw)))
  np.testing.assert_array_equal(ours, ref)  # before the fix: early_stopping="never" kept too few candidates


@pytest.mark.parametrize("kw", BEAMS[:2], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_beam_search_equals_transformers_t5(t5, kw):
  torch_model, model = t5
  ids, mask, _ = test_t5.padded_batch()
  steps = 6
  # use_cache=False: transformers 5.24 sizes the T5 cache by num_layers, not num_decoder_layers
  ref = reference_beams(torch_model, ids, mask, steps, 1, kw, use_cache=False)[:, 1:]  # drop the start token
  ours = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=steps, eos_ids=(1,), pad_id=PAD, **kw)))
  np.testing.assert_array_equal(ours, pad_to(ref, steps))


def test_t5_greedy_equals_transformers(t5):
  torch_model, model = t5
  ids, mask, _ = test_t5.padded_batch()
  ref = reference_beams(torch_model, ids, mask, 6, 1, dict(num_beams=1), use_cache=False)[:, 1:]
  ours = np.asarray(sampling.generate(model, ids, mask, DecodeConfig(max_new_tokens=6, eos_ids=(1,), pad_id=PAD)))
  np.testing.assert_array_equal(ours, pad_to(ref, 6))


def test_stop_token_ids_from_the_real_tokenizer(smollm2_tokenizer):
  ids = sampling.stop_token_ids(smollm2_tokenizer, ["\n"])
  newline = smollm2_tokenizer("a\nb", add_special_tokens=False)["input_ids"]
  assert any(i in ids for i in newline) and len(ids) < 2000
  assert smollm2_tokenizer("hello", add_special_tokens=False)["input_ids"][0] not in ids
