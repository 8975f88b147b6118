"""Data-quality metrics on hand-computed toy corpora."""
import math

import numpy as np
import pytest

from msp_jax.metrics import text_quality


def test_distinct_n_by_hand():
  texts = ["the cat sat", "The cat ran"]
  # lowercased tokens: the cat sat | the cat ran
  assert text_quality.distinct_n(texts, 1) == pytest.approx(4 / 6)  # {the, cat, sat, ran} of 6
  assert text_quality.distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
  assert text_quality.distinct_n(texts, 3) == pytest.approx(2 / 2)
  assert text_quality.distinct_n(texts, 4) == 0.0  # no 4-grams at all
  assert text_quality.distinct_n([], 1) == 0.0


def test_self_bleu_by_hand():
  # two identical texts: each is a perfect match of the other
  assert text_quality.self_bleu(["a b c d", "a b c d"]) == pytest.approx(100.0)
  # the third text shares nothing: 0/4, 0/3, 0/2, 0/1 smoothed to 1/(2*4), 1/(4*3), 1/(8*2), 1/(16*1)
  unrelated = 100 * (1 / (8 * 12 * 16 * 16)) ** 0.25
  got = text_quality.self_bleu(["a b c d", "a b c d", "w x y z"])
  assert got == pytest.approx((100 + 100 + unrelated) / 3)


def test_self_bleu_is_mean_of_leave_one_out_corpus_bleu():
  # repeated n-grams in several texts and different lengths exercise clipping and the closest length
  texts = ["the the the cat", "the the dog", "the cat", "a dog barks loudly today", "the the the cat",
           "a cat and a dog", "dog"]
  # the 6-token text's closest reference has 7 tokens (not its own 6): brevity penalty applies
  brevity = ["the cat sat on the mat", "the cat sat on the mat today", "a cat sat on the mat today"]
  want = [text_quality.corpus_bleu([t], [brevity[:i] + brevity[i + 1:]]) for i, t in enumerate(brevity)]
  assert text_quality.self_bleu(brevity) == pytest.approx(np.mean(want))
  per_text = [text_quality.corpus_bleu([t], [texts[:i] + texts[i + 1:]]) for i, t in enumerate(texts)]
  assert text_quality.self_bleu(texts) == pytest.approx(np.mean(per_text))
  subset = text_quality.self_bleu(texts, max_texts=3, seed=5)
  assert subset == text_quality.self_bleu(texts, max_texts=3, seed=5)
  means = {round(np.mean([per_text[i], per_text[j], per_text[k]]), 9)
           for i in range(7) for j in range(i + 1, 7) for k in range(j + 1, 7)}
  assert round(subset, 9) in means
  assert text_quality.self_bleu(texts, max_texts=100) == pytest.approx(np.mean(per_text))


def test_self_bleu_needs_two_texts():
  assert math.isnan(text_quality.self_bleu(["only one text"]))
  assert math.isnan(text_quality.self_bleu([]))


def test_ngram_overlap_counts_occurrences():
  generated, seeds = ["book a room", "the Room room"], ["please book a room now"]
  # unigrams book a room the room room: book, a and room three times are in the seeds -> 5/6
  # (the set {book, a, room, the} would give 3/4)
  assert text_quality.ngram_overlap(generated, seeds, 1) == pytest.approx(5 / 6)
  # bigrams (book a) (a room) (the room) (room room): first two are seed bigrams
  assert text_quality.ngram_overlap(generated, seeds, 2) == pytest.approx(2 / 4)
  assert text_quality.ngram_overlap(["hi"], seeds, 2) == 0.0


def test_label_presence_whole_words_case_insensitive():
  records = [
      {"text": "Book a table at Nobu for two", "attributes": {}, "values": ["nobu", "two"], "spans": []},
      {"text": "I love the party", "attributes": {}, "values": ["art"], "spans": []},  # inside a word
      {"text": "hello", "attributes": {"intents": ["greet"]}, "values": [], "spans": []},
      {"text": "Play Rock Music", "attributes": {}, "values": ["rock music", "jazz"], "spans": []},
      {"text": "see C++ docs", "attributes": {}, "values": ["c++"], "spans": []},
  ]
  rate, flags = text_quality.label_presence(records)
  assert flags == [True, False, None, False, True]
  assert rate == pytest.approx(2 / 4)
  assert math.isnan(text_quality.label_presence([records[2]])[0])


def test_token_nll_by_hand():
  # row softmaxes: [1/4, 2/4, 1/4] and [3/5, 1/5, 1/5]
  rows = np.log(np.array([[1.0, 2.0, 1.0], [3.0, 1.0, 1.0]]))
  logits = np.stack([rows, rows + 1000.0])  # a large offset must not overflow
  targets = np.array([[1, 0], [1, -100]])
  mask = np.array([[1, 1], [1, 0]])
  sums, counts = text_quality.token_nll(logits, targets, mask)
  np.testing.assert_allclose(sums, [math.log(2) + math.log(5 / 3), math.log(2)], rtol=1e-12)
  np.testing.assert_array_equal(counts, [2, 1])


def test_perplexity_weighs_tokens_not_sequences():
  # 6 nats over 4 tokens; the mean of per-sequence perplexities would be (e^2 + e^(4/3)) / 2
  assert text_quality.perplexity_from_nll([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(1.5))
  assert math.isnan(text_quality.perplexity_from_nll([0.0], [0]))
  with pytest.raises(ValueError):
    text_quality.perplexity_from_nll([1.0, 2.0], [3])


def zipf_pool(n, seed):
  """n texts of 4-11 words drawn from one Zipf distribution over 300 words."""
  rng = np.random.default_rng(seed)
  p = 1 / np.arange(1, 301)
  return [" ".join(rng.choice([f"w{i}" for i in range(300)], rng.integers(4, 12), p=p / p.sum())) for _ in range(n)]


def test_diversity_compares_sets_of_different_sizes_on_equal_samples():
  # five pairs of a 60-text and a 600-text set from the same distribution
  pairs = [(zipf_pool(60, s), zipf_pool(600, 100 + s)) for s in range(5)]
  whole = np.mean([[text_quality.distinct_n(a, 2) - text_quality.distinct_n(b, 2),
                    text_quality.self_bleu(a) - text_quality.self_bleu(b)] for a, b in pairs], axis=0)
  assert whole[0] > 0.2 and whole[1] < -8  # on whole sets the larger one looks far less diverse
  sampled = [(text_quality.sampled_diversity(a, 30, draws=5), text_quality.sampled_diversity(b, 30, draws=5)) for a, b in pairs]
  gap = {k: np.mean([x[k] - y[k] for x, y in sampled]) for k in ("distinct_1", "distinct_2", "distinct_3", "self_bleu")}
  assert abs(gap["distinct_1"]) < 0.02 and abs(gap["distinct_2"]) < 0.03 and abs(gap["distinct_3"]) < 0.01
  assert abs(gap["self_bleu"]) < 2.5


def test_sampled_diversity_by_hand():
  texts = ["a b", "a c", "b c", "a b"]
  # a set of exactly the sample size is its own sample
  assert text_quality.sampled_diversity(texts, 4) == {
      "distinct_1": pytest.approx(3 / 8), "distinct_2": pytest.approx(3 / 4), "distinct_3": 0.0,
      "self_bleu": pytest.approx(text_quality.self_bleu(texts))}
  # samples of 2 of the 6 pairs: each one's mean is one of the pairs' values
  got = text_quality.sampled_diversity(texts, 2, draws=1, seed=3)
  pairs = [[texts[i], texts[j]] for i in range(4) for j in range(i + 1, 4)]
  assert any(got["distinct_2"] == pytest.approx(text_quality.distinct_n(p, 2)) and
             got["self_bleu"] == pytest.approx(text_quality.self_bleu(p)) for p in pairs)
  assert text_quality.sampled_diversity(texts, 2, draws=3, seed=3) == text_quality.sampled_diversity(texts, 2, draws=3, seed=3)
  # fewer texts than the sample size: undefined at that size
  assert all(math.isnan(v) for v in text_quality.sampled_diversity(texts, 5).values())
  with pytest.raises(ValueError):
    text_quality.sampled_diversity(texts, 1)


def test_quality_reports_diversity_on_equal_size_samples(load_task, smollm2_tokenizer):
  from flax import nnx
  from ml_collections import ConfigDict
  from msp_jax import experiment, task_models
  from msp_jax.models import llama, weights
  cfg = llama.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
  backbone = weights.Backbone(model=llama.Llama(cfg, rngs=nnx.Rngs(0)), config=cfg, tokenizer=smollm2_tokenizer,
                              model_type="llama", source="tiny")
  task = load_task("nlupp", "hotels", "few_shot")
  c = ConfigDict({"downstream_hidden": 0, "downstream_steps": 10, "downstream_l2": (1e-3,), "downstream_eval_every": 10,
                  "downstream_thresholds": (0.5,)})
  judge = task_models.IntentModel(task, task_models.FeatureCache(backbone), c, 0).fit(
      [experiment.example_record(ex) for ex in task.splits["train"]], list(task.splits["dev"])[:20])
  records = lambda texts: [{"text": t, "attributes": {"intents": ["affirm"]}, "values": []} for t in texts]
  small, large = zipf_pool(40, 1), zipf_pool(240, 101)
  # the two sets differ on the whole: distinct-1 0.365 vs 0.133, distinct-2 0.863 vs 0.725
  assert text_quality.distinct_n(small, 1) - text_quality.distinct_n(large, 1) > 0.2
  assert text_quality.distinct_n(small, 2) - text_quality.distinct_n(large, 2) > 0.1
  small, large = experiment.quality(records(small), task, judge, backbone), experiment.quality(records(large), task, judge, backbone)
  assert (small["examples"], large["examples"]) == (40, 240)
  assert (small["quality_sample"], small["quality_draws"]) == (30, 5)
  # on samples of 30 texts the same distribution measures the same
  assert abs(small["distinct_1"] - large["distinct_1"]) < 0.04
  assert abs(small["distinct_2"] - large["distinct_2"]) < 0.04
  # NLU++'s values are slot names, not words an utterance must contain: no label presence there
  named = [{"text": "a room for two at noon", "attributes": {"intents": ["booking"]}, "values": ["time", "number of people"]}]
  assert experiment.quality(named, task, judge, backbone)["label_presence"] is None
