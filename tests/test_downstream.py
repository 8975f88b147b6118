"""Downstream heads learn separable toy data; selection on dev picks the best snapshot and never sees
test labels; BIO tags from spans; word features match direct calls."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msp_jax import downstream, experiment, features, task_models
from msp_jax.metrics import task_scores, text_quality
from msp_jax.data import spans as spans_lib
from msp_jax.data.example import Example
from msp_jax.models import llama, weights


# --- multi-label classifier ---------------------------------------------------------------------

def multilabel_toy(n, seed, num_labels=5, dim=32, noise=0.3):
  """Features are a noisy sum of one centre per present label: linearly separable at low noise."""
  centres = np.random.default_rng(99).normal(0.0, 3.0, (num_labels, dim))
  rng = np.random.default_rng(seed)
  y = (rng.random((n, num_labels)) < 0.3).astype(np.float32)
  x = y @ centres + rng.normal(0.0, noise, (n, dim)) + 5.0  # an offset: standardizing must cope
  return x.astype(np.float32), y


@pytest.mark.parametrize("hidden,batch_size", [(0, 0), (16, 32)])
def test_multilabel_learns_and_predicts_empty_sets(hidden, batch_size):
  x, y = multilabel_toy(300, seed=0)
  xt, yt = multilabel_toy(200, seed=1)
  clf = downstream.MultiLabelClassifier(hidden=hidden, batch_size=batch_size, steps=300, seed=0).fit(x, y)
  pred = clf.predict(xt)
  assert pred.dtype == bool and pred.shape == yt.shape
  assert (pred == yt.astype(bool)).all(1).mean() >= 0.95  # exact set match
  empty = yt.sum(1) == 0
  assert empty.sum() >= 10 and not pred[empty].any()


def test_same_seed_same_model_other_seed_other_model():
  x, y = multilabel_toy(100, seed=0)
  fit = lambda seed: downstream.MultiLabelClassifier(steps=20, batch_size=16, seed=seed).fit(x, y).probabilities(x)
  a, b, c = fit(3), fit(3), fit(4)
  assert np.array_equal(a, b) and not np.allclose(a, c)


# --- BIO tagger ---------------------------------------------------------------------------------

TAGS = spans_lib.bio_labels(["per", "loc"])


def tagging_toy(n, seed, dim=24):
  """Sentences of valid BIO tags; each word's features are its tag's centre plus noise."""
  centres = np.random.default_rng(98).normal(0.0, 2.0, (len(TAGS), dim))
  rng = np.random.default_rng(seed)
  feats, ids = [], []
  for _ in range(n):
    names = downstream.repair_bio([TAGS[i] for i in rng.integers(0, len(TAGS), rng.integers(1, 9))])
    row = [TAGS.index(t) for t in names]
    feats.append((centres[row] + rng.normal(0.0, 0.5, (len(row), dim))).astype(np.float32))
    ids.append(row)
  return feats, ids


@pytest.mark.parametrize("hidden,batch_size", [(0, 0), (32, 64)])
def test_tagger_learns_word_tags(hidden, batch_size):
  x, y = tagging_toy(150, seed=0)
  xt, yt = tagging_toy(100, seed=1)
  tagger = downstream.BIOTagger(tags=TAGS, hidden=hidden, batch_size=batch_size, steps=300, seed=0).fit(x, y)
  pred = tagger.predict(xt + [np.zeros((0, 24), np.float32)])
  assert [len(p) for p in pred] == [len(t) for t in yt] + [0]
  assert np.mean(np.concatenate(pred[:-1]) == np.concatenate(yt)) >= 0.95


def test_repair_bio_starts_every_entity_with_b():
  got = downstream.repair_bio(["I-per", "I-per", "O", "I-loc", "B-per", "I-loc", "I-loc"])
  assert got == ["B-per", "I-per", "O", "B-loc", "B-per", "B-loc", "I-loc"]


def test_tagger_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match="sentence 0 has 2 word features but 3 tags"):
    downstream.BIOTagger(tags=TAGS).fit([np.zeros((2, 4))], [[0, 0, 0]])


# --- targets from records -----------------------------------------------------------------------

def test_bio_tags_entity_at_end_multiword_and_punctuation():
  text = "I want to fly to New York."
  start = text.index("New")
  spans = [{"type": "loc", "start": start, "end": start + len("New York")}]
  assert spans_lib.bio_tags(text, spans) == ["O"] * 5 + ["B-loc", "I-loc"]


def test_bio_tags_overlapping_span_is_dropped():
  text = "Ada Lovelace met Babbage"
  spans = [{"type": "per", "start": 0, "end": 12}, {"type": "loc", "start": 4, "end": 12},
           {"type": "per", "start": 17, "end": 24}]
  assert spans_lib.bio_tags(text, spans) == ["B-per", "I-per", "O", "B-per"]


def test_intent_targets_from_examples_and_records():
  labels = ["balance", "card", "transfer"]
  records = [Example(uid="a", domain="banking", text="x", attributes={"intents": ("card", "transfer")}),
             Example(uid="b", domain="banking", text="y", attributes={"intents": ()}),
             {"text": "z", "attributes": {"intents": ["balance"]}}]
  got = downstream.intent_targets(records, labels)
  assert got.dtype == np.float32
  assert got.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
  with pytest.raises(ValueError, match="'loan'"):
    downstream.intent_targets([{"attributes": {"intents": ["loan"]}}], labels)


# --- features from a tiny random Llama ----------------------------------------------------------

@pytest.fixture(scope="module")
def backbone(smollm2_tokenizer):
  cfg = llama.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  return weights.Backbone(model=model, config=cfg, tokenizer=smollm2_tokenizer, model_type="llama", source="tiny")


def direct_hidden(backbone, ids):
  model = backbone.model
  ids = jnp.asarray([ids], jnp.int32)
  return np.asarray(model.hidden_states(model.embed_tokens(ids), jnp.ones(ids.shape, bool))[0][0])


TEXTS = ["Play unbelievably loud music in Zürich, 2003 style!",
         "hi",
         "",
         "Stade de France hosted the 2003 World Championships in Athletics ."]


def test_token_features_are_hidden_states_at_first_subtokens(backbone):
  tok = backbone.tokenizer
  got = features.token_features(backbone, TEXTS, batch_size=2)
  assert [g.shape for g in got] == [(len(t.split()), 16) for t in TEXTS]
  lone_spaces = 0
  for text, g in zip(TEXTS, got):
    if not text:
      continue
    ids = tok(text, add_special_tokens=False)["input_ids"]
    hidden = direct_hidden(backbone, ids)
    words = text.split()
    for j in range(len(words)):
      # Word j starts where the tokens of the words before it end (byte-level BPE splits before
      # spaces), past a lone-space token (SmolLM2 splits digits apart, so " 2003" is " ", "2", ...).
      first = len(tok(" ".join(words[:j]), add_special_tokens=False)["input_ids"]) if j else 0
      if tok.decode(ids[first:first + 1]) == " ":
        first, lone_spaces = first + 1, lone_spaces + 1
      assert tok.decode(ids[:first]).strip() == " ".join(words[:j])
      np.testing.assert_allclose(g[j], hidden[first], atol=1e-4)
  assert lone_spaces == 2 and len(tok("unbelievably", add_special_tokens=False)["input_ids"]) > 1


def test_token_features_zero_and_count_truncated_words(backbone):
  words = np.random.default_rng(0).choice(["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"], 300)
  text = " ".join(words)
  ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
  assert len(ids) == 300  # one token per word
  with pytest.warns(UserWarning, match="44 words"):
    got = features.token_features(backbone, [text, "short one"])[0]
  limit = features.LENGTH_BUCKETS[-1]
  assert got.shape == (300, 16) and not got[limit:].any()
  np.testing.assert_allclose(got[:limit], direct_hidden(backbone, ids[:limit]), atol=1e-4)  # the start is kept


def test_text_embeddings_are_mean_hidden_states(backbone):
  got = features.text_embeddings(backbone, TEXTS, batch_size=3)
  for text, g in zip(TEXTS, got):
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    want = direct_hidden(backbone, ids).mean(0) if ids else np.zeros(16)
    np.testing.assert_allclose(g, want, atol=1e-4)


@pytest.mark.parametrize("texts,shown", [(64, True), (62, False)])
def test_a_long_feature_call_shows_its_progress_and_a_short_one_stays_quiet(backbone, texts, shown, monkeypatch,
                                                                            capsys):
  monkeypatch.setattr(features, "PROGRESS_MIN_BATCHES", 32)  # batch 2: 64 texts make 32 batches, 62 make 31
  got = features.token_features(backbone, [f"word {i}" for i in range(texts)], batch_size=2)
  assert len(got) == texts
  err = capsys.readouterr().err
  assert (f"word features ({texts} texts)" in err) == shown and ("32/32" in err) == shown


def test_text_nll_equals_the_numpy_reference(backbone):
  texts = ["book a room for two nights", "hi", "where is the spa and when does it open?"]
  sums, counts = features.text_nll(backbone, texts)
  for text, s, n in zip(texts, sums, counts):
    ids = np.asarray(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])[None]
    logits = np.asarray(backbone.model(jnp.asarray(ids)))
    ref_s, ref_n = text_quality.token_nll(logits[:, :-1], ids[:, 1:], np.ones_like(ids[:, 1:], bool))
    assert n == ref_n[0] == ids.shape[1] - 1
    np.testing.assert_allclose(s, ref_s[0], rtol=1e-4)


# --- selection on dev ---------------------------------------------------------------------------

def as_sets(matrix):
  return [set(np.flatnonzero(row).tolist()) for row in np.asarray(matrix)]


def test_multilabel_fit_selected_keeps_the_best_dev_snapshot():
  # few noisy examples: the L2 strength, the step and the threshold all change the dev score
  x, y = multilabel_toy(30, seed=0, noise=6.0)
  xd, yd = multilabel_toy(80, seed=1, noise=6.0)
  grid = downstream.SelectionGrid(l2=(1e-4, 3e-1), eval_every=10, thresholds=(0.3, 0.5, 0.7))
  clf = downstream.MultiLabelClassifier(steps=30, seed=0).fit_selected(x, y, xd, yd, grid)
  # reference: every (l2, steps) trained from scratch with plain fit, every threshold scored by metrics/task_scores.py
  dev = {}
  for l2 in grid.l2:
    for steps in (10, 20, 30):
      probs = downstream.MultiLabelClassifier(steps=steps, l2=l2, seed=0).fit(x, y).probabilities(xd)
      for t in grid.thresholds:
        dev[l2, steps, t] = task_scores.multilabel_prf(as_sets(yd), as_sets(probs > t))["micro_f1"]
  assert len({round(v, 6) for v in dev.values()}) > 3  # the choice matters
  chosen = clf.selection
  assert chosen["dev_score"] == pytest.approx(max(dev.values()))
  assert dev[chosen["l2"], chosen["steps"], chosen["threshold"]] == pytest.approx(max(dev.values()))
  assert chosen["dev_metric"] == "micro_f1" and (clf.l2, clf.threshold) == (chosen["l2"], chosen["threshold"])
  # the kept model is that snapshot, not the last one trained
  assert task_scores.multilabel_prf(as_sets(yd), as_sets(clf.predict(xd)))["micro_f1"] == pytest.approx(max(dev.values()))


def test_tagger_fit_selected_keeps_the_best_dev_snapshot():
  x, y = tagging_toy(20, seed=0)
  x = [f + np.random.default_rng(5).normal(0.0, 3.0, f.shape).astype(np.float32) for f in x]
  xd, yd = tagging_toy(60, seed=1)
  xd = [f + np.random.default_rng(6).normal(0.0, 3.0, f.shape).astype(np.float32) for f in xd]
  grid = downstream.SelectionGrid(l2=(1e-4, 1.0), eval_every=5)
  tagger = downstream.BIOTagger(tags=TAGS, steps=15, seed=0).fit_selected(x, y, xd, yd, grid)
  spans = lambda rows: [task_scores.bio_to_spans([TAGS[i] for i in row]) for row in rows]
  dev = {(l2, steps): task_scores.span_f1(spans(yd), spans(downstream.BIOTagger(tags=TAGS, steps=steps, l2=l2, seed=0)
                                                     .fit(x, y).predict(xd)))["f1"]
         for l2 in grid.l2 for steps in (5, 10, 15)}
  assert len({round(v, 6) for v in dev.values()}) > 1
  chosen = tagger.selection
  assert chosen["dev_metric"] == "span_f1" and "threshold" not in chosen
  assert chosen["dev_score"] == pytest.approx(max(dev.values())) == pytest.approx(dev[chosen["l2"], chosen["steps"]])
  assert task_scores.span_f1(spans(yd), spans(tagger.predict(xd)))["f1"] == pytest.approx(max(dev.values()))


def test_selection_grid_rejects_bad_values():
  with pytest.raises(ValueError, match="thresholds in"):
    downstream.SelectionGrid(thresholds=(0.5, 1.0))
  with pytest.raises(ValueError, match="eval_every >= 1"):
    downstream.SelectionGrid(eval_every=0)


class NoisyLabelFeatures:
  """Stand-in features: each text's gold labels as first seen (intent one-hots, or one-hot BIO tags
  per word) plus Gaussian noise. Informative but not separable, so the dev choices matter; a test
  label changed later does not change the features."""

  def __init__(self, examples, intents=(), tags=(), noise=1.0):
    rng = np.random.default_rng(0)
    self.sentences, self.words = {}, {}
    for ex in examples:
      if intents:
        hot = np.array([float(n in ex.attributes["intents"]) for n in intents])
        self.sentences[ex.text] = np.concatenate([hot, np.zeros(4)]) + rng.normal(0.0, noise, len(intents) + 4)
      if tags:
        hot = np.eye(len(tags))[[tags.index(t) for t in spans_lib.example_bio_tags(ex)]].reshape(-1, len(tags))
        self.words[ex.text] = np.concatenate([hot, np.zeros((len(hot), 4))], 1) + rng.normal(0.0, noise, (len(hot), len(tags) + 4))

  def sentence(self, texts):
    return np.stack([self.sentences[t] for t in texts]).astype(np.float32)

  def per_word(self, texts):
    return [self.words[t].astype(np.float32) for t in texts]


def shuffled_test_labels(dataset, test):
  """The same test texts with other labels: NLU++ intents rotated by one utterance, CrossNER entity
  types rotated through the type list (the gold spans keep their places, with other types)."""
  import dataclasses
  if dataset == "nlupp":
    return [dataclasses.replace(ex, attributes=test[(i + 1) % len(test)].attributes) for i, ex in enumerate(test)]
  types = sorted({s["type"] for ex in test for s in ex.spans})
  rotate = {t: types[(i + 1) % len(types)] for i, t in enumerate(types)}
  return [dataclasses.replace(ex, typed_values=tuple((rotate[t], v) for t, v in ex.typed_values),
                              spans=tuple(dict(s, type=rotate[s["type"]]) for s in ex.spans)) for ex in test]


@pytest.mark.parametrize("dataset,domain", [("nlupp", "hotels"), ("crossner", "music")])
def test_selection_never_sees_the_test_labels(load_task, dataset, domain):
  from ml_collections import ConfigDict
  task = load_task(dataset, domain, "few_shot")
  train, dev, test = list(task.splits["train"]), list(task.splits["dev"])[:80], list(task.splits["test"])[:80]
  if dataset == "nlupp":
    cache = NoisyLabelFeatures(train + dev + test, intents=list(task.ontology["intents"].names))
  else:
    cache = NoisyLabelFeatures(train + dev + test, tags=spans_lib.bio_labels(task.ontology["entities"].names))
  c = ConfigDict({"downstream_hidden": 0, "downstream_steps": 40, "downstream_l2": (1e-4, 1e-2, 1.0),
                  "downstream_eval_every": 20, "downstream_thresholds": (0.3, 0.5, 0.7)})
  records = [experiment.example_record(ex) for ex in train]
  _, real = task_models.downstream_run(task, cache, c, 0, {"": records}, dev, test)
  _, fake = task_models.downstream_run(task, cache, c, 0, {"": records}, dev, shuffled_test_labels(dataset, test))
  assert real["selection"] == fake["selection"]  # the same choices and dev scores
  assert real["scores"] != fake["scores"]  # while the test labels did change the test scores
  (head, chosen), = real["selection"].items()
  assert chosen["l2"] in c.downstream_l2 and chosen["steps"] in (20, 40)
  assert dataset == "crossner" or chosen["threshold"] in c.downstream_thresholds
  assert json.loads(json.dumps(real)) == real  # goes into the run's JSON as it is
  # the recorded dev score is the selected model's own score on dev
  model = task_models.MODELS[dataset](task, cache, c, 0).fit(records, dev)
  assert model.score(dev)[task_models.MAIN_METRIC[dataset]] == pytest.approx(chosen["dev_score"])


def test_tagger_word_mask_is_training_on_the_unmasked_words_alone():
  x, y = tagging_toy(60, seed=3)
  mask = [np.random.default_rng(i).random(len(row)) < 0.6 for i, row in enumerate(y)]
  kept_x = [f[m] for f, m in zip(x, mask)]
  kept_y = [list(np.asarray(row)[m]) for row, m in zip(y, mask)]
  masked = downstream.BIOTagger(tags=TAGS, steps=40, seed=0).fit(x, y, word_mask=mask)
  reference = downstream.BIOTagger(tags=TAGS, steps=40, seed=0).fit(kept_x, kept_y)
  full = downstream.BIOTagger(tags=TAGS, steps=40, seed=0).fit(x, y)
  probe = np.concatenate(tagging_toy(20, seed=4)[0])
  np.testing.assert_allclose(masked._forward(probe), reference._forward(probe), rtol=1e-6, atol=1e-6)
  assert not np.allclose(masked._forward(probe), full._forward(probe), atol=1e-3)  # the mask did something
  with pytest.raises(ValueError, match="sentence 0 has .* tags but .* word_mask entries"):
    downstream.BIOTagger(tags=TAGS).fit(x, y, word_mask=[m[:-1] for m in mask])
  with pytest.raises(ValueError, match="leaves no word"):
    downstream.BIOTagger(tags=TAGS).fit(x, y, word_mask=[np.zeros(len(m), bool) for m in mask])


def test_entity_model_masks_only_the_o_words_of_synthetic_records(backbone):
  """mask_synthetic_o: the tagger trains on the real sentences whole and on the entity words of synthetic ones."""
  from ml_collections import ConfigDict
  from msp_jax.data.ontology import Attribute, AttributeSet, Ontology
  ontology = Ontology("crossner", (AttributeSet("entities", (Attribute("country", "country", False),
                                                               Attribute("person", "person", True))),), ("news",))
  task = type("Task", (), {"ontology": ontology})()
  real = {"text": "Ada Lovelace visited France", "spans": [{"type": "person", "start": 0, "end": 12},
                                                           {"type": "country", "start": 21, "end": 27}]}
  synthetic = {"text": "Alan Turing lived in Britain today", "spans": [{"type": "person", "start": 0, "end": 11}],
               "synthetic": True}  # Britain is an entity the generator was not asked for: tagged O
  dev = [Example(uid="d", domain="news", text="France met Ada", attributes={"entities": ("country", "person")},
                 spans=({"type": "country", "start": 0, "end": 6}, {"type": "person", "start": 11, "end": 14}))]
  c = ConfigDict(dict(downstream_hidden=0, downstream_steps=30, downstream_l2=(1e-3,), downstream_eval_every=10,
                      downstream_thresholds=(0.5,), mask_synthetic_o=True))
  cache = task_models.FeatureCache(backbone)
  model = task_models.EntityModel(task, cache, c, seed=0).fit([real, synthetic], dev)
  tags = model.tags
  words = cache.per_word([real["text"], synthetic["text"]])
  real_tags = [tags.index(t) for t in ("B-person", "I-person", "O", "B-country")]
  reference = downstream.BIOTagger(tags=tags, steps=30, seed=0).fit_selected(
      [words[0], words[1][:2]], [real_tags, [tags.index("B-person"), tags.index("I-person")]],
      cache.per_word([dev[0].text]), [[tags.index(t) for t in ("B-country", "O", "B-person")]], task_models.selection_grid(c))
  probe = np.concatenate(words)
  np.testing.assert_allclose(model.model._forward(probe), reference._forward(probe), rtol=1e-6, atol=1e-6)


def test_the_entity_model_trains_with_the_taggers_own_steps_and_l2_grid(backbone):
  """tagger_steps and tagger_l2 replace downstream_steps and downstream_l2 for the span tagger only, and
  tagger_batch_size sets its words per step: the model is the BIOTagger fit_selected with them (an
  independent fit), and 0 / () / 0 are the heads' settings (full batch)."""
  from ml_collections import ConfigDict
  from msp_jax.data.ontology import Attribute, AttributeSet, Ontology
  ontology = Ontology("crossner", (AttributeSet("entities", (Attribute("country", "country", False),
                                                               Attribute("person", "person", True))),), ("news",))
  task = type("Task", (), {"ontology": ontology})()
  real = {"text": "Ada Lovelace visited France", "spans": [{"type": "person", "start": 0, "end": 12},
                                                           {"type": "country", "start": 21, "end": 27}]}
  dev = [Example(uid="d", domain="news", text="France met Ada", attributes={"entities": ("country", "person")},
                 spans=({"type": "country", "start": 0, "end": 6}, {"type": "person", "start": 11, "end": 14}))]
  cache = task_models.FeatureCache(backbone)
  words, dev_words = cache.per_word([real["text"]]), cache.per_word([dev[0].text])
  heads = dict(downstream_hidden=0, downstream_steps=20, downstream_l2=(1e-3,), downstream_eval_every=10,
               downstream_thresholds=(0.5,))
  for own, (steps, l2, per_step) in ((dict(tagger_steps=70, tagger_l2=(3e-2, 1e-4), tagger_batch_size=3), (70, (3e-2, 1e-4), 3)),
                                  (dict(tagger_steps=0, tagger_l2=(), tagger_batch_size=0), (20, (1e-3,), 0))):
    model = task_models.EntityModel(task, cache, ConfigDict(dict(heads, **own)), seed=0).fit([real], dev)
    tags = model.tags
    reference = downstream.BIOTagger(tags=tags, steps=steps, batch_size=per_step, seed=0).fit_selected(
        words, [[tags.index(t) for t in ("B-person", "I-person", "O", "B-country")]], dev_words,
        [[tags.index(t) for t in ("B-country", "O", "B-person")]], downstream.SelectionGrid(l2=l2, eval_every=10))
    assert (model.model.steps, model.model.batch_size) == (steps, per_step) and model.selection["entities"] == reference.selection, own
    np.testing.assert_allclose(model.model._forward(words[0]), reference._forward(words[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("patience,seen,chosen", [(2, 7, (1e-2, 10, 0.65)), (0, 10, (1e-3, 60, 0.9))])
def test_patience_stops_an_l2_after_that_many_dev_scores_without_a_new_best_of_its_own(patience, seen, chosen):
  """Hand-counted: patience 2 stops L2 1e-3 at its 4th score (0.6 ties, 0.55 is lower: its 0.7 and 0.9 are
  never reached) and 1e-2 at its 3rd; patience 0 trains every step and finds 0.9."""
  scores = {1e-3: [0.5, 0.6, 0.6, 0.55, 0.7, 0.9], 1e-2: [0.65, 0.64, 0.63, 0.8]}
  calls = []

  def fit(trainer, on_eval):
    trainer.model, trainer.mean, trainer.std = downstream._Head(2, 0, 2, nnx.Rngs(0)), 0.0, 1.0
    for i in range(len(scores[trainer.l2])):
      calls.append((trainer.l2, i))
      if on_eval(10 * (i + 1)):
        break

  head = downstream.MultiLabelClassifier()
  head._select(fit, lambda trainer: (scores[calls[-1][0]][calls[-1][1]], {}),
               downstream.SelectionGrid(l2=(1e-3, 1e-2), eval_every=10, patience=patience), "micro_f1")
  assert len(calls) == seen
  assert (head.selection["l2"], head.selection["steps"], head.selection["dev_score"]) == chosen


@pytest.mark.parametrize("field,value", [("tagger_steps", -5), ("tagger_steps", 2.5), ("tagger_l2", (-1.0,)),
                                         ("tagger_batch_size", -1), ("tagger_patience", -2)])
def test_a_bad_tagger_setting_is_a_one_line_error_naming_it(field, value):
  from ml_collections import ConfigDict
  fields = dict(downstream_hidden=0, downstream_steps=20, downstream_l2=(1e-3,), downstream_eval_every=10,
                downstream_thresholds=(0.5,), tagger_steps=0, tagger_l2=(), tagger_batch_size=0, tagger_patience=0)
  c = ConfigDict({**fields, field: value})
  with pytest.raises(task_models.SelectionError, match=f"config.{field}="):
    task_models.check_selection(c)


def test_the_dev_split_chooses_among_candidate_training_sets(load_task):
  """Several training sets (a pool with and without a consistency filter): each trains a model, the best
  dev score picks the one scored on test, whatever its place in the list and whatever the test labels."""
  from ml_collections import ConfigDict
  task = load_task("nlupp", "hotels", "few_shot")
  train, dev, test = list(task.splits["train"]), list(task.splits["dev"])[:80], list(task.splits["test"])[:80]
  cache = NoisyLabelFeatures(train + dev + test, intents=list(task.ontology["intents"].names))
  c = ConfigDict({"downstream_hidden": 0, "downstream_steps": 40, "downstream_l2": (1e-4, 1e-2),
                  "downstream_eval_every": 20, "downstream_thresholds": (0.3, 0.5, 0.7)})
  right = [experiment.example_record(ex) for ex in train]
  wrong = [dict(r, attributes=right[(i + 1) % len(right)]["attributes"]) for i, r in enumerate(right)]
  candidates = {"wrong": wrong, "right": right}
  chosen, real = task_models.downstream_run(task, cache, c, 0, candidates, dev, test)
  assert chosen == "right" and set(real["candidates_dev_score"]) == {"wrong", "right"}
  assert real["candidates_dev_score"]["right"] > real["candidates_dev_score"]["wrong"]
  assert real["candidates_dev_score"]["right"] == real["selection"]["intents"]["dev_score"]
  alone = task_models.IntentModel(task, cache, c, 0).fit(right, dev)
  assert real["scores"] == alone.score(test)  # the chosen model, scored once
  fake_chosen, fake = task_models.downstream_run(task, cache, c, 0, candidates, dev, shuffled_test_labels("nlupp", test))
  assert fake_chosen == chosen and fake["candidates_dev_score"] == real["candidates_dev_score"]
  assert fake["scores"] != real["scores"]
  # a tie goes to the first candidate
  first, _ = task_models.downstream_run(task, cache, c, 0, {"a": right, "b": list(right)}, dev, test)
  assert first == "a"


@pytest.mark.parametrize("source_data,metric", [(False, "micro_f1"), (True, "general_intent_f1")])
def test_nlupp_is_selected_on_the_metric_its_setting_is_ranked_by(load_task, source_data, metric):
  """Few-shot NLU++ is ranked by micro F1 over every intent, domain adaptation by the general intents'
  (the original's cross-domain score): each run's dev selection uses that score, and the recorded dev
  score is the selected model's own score on dev."""
  from ml_collections import ConfigDict
  task = load_task("nlupp", "hotels", "few_shot")
  train, dev = list(task.splits["train"]), list(task.splits["dev"])[:80]
  cache = NoisyLabelFeatures(train + dev, intents=list(task.ontology["intents"].names), noise=1.5)
  c = ConfigDict({"downstream_hidden": 0, "downstream_steps": 40, "downstream_l2": (1e-4, 1e-2, 1.0),
                  "downstream_eval_every": 20, "downstream_thresholds": (0.3, 0.5, 0.7), "source_data": source_data})
  model = task_models.IntentModel(task, cache, c, 0).fit([experiment.example_record(ex) for ex in train], dev)
  chosen = model.selection["intents"]
  scores = model.score(dev)
  assert chosen["dev_metric"] == metric and scores[metric] == pytest.approx(chosen["dev_score"])
  assert scores["general_intent_f1"] != pytest.approx(scores["micro_f1"])  # the two scores differ here


def test_the_attribute_judge_is_the_same_in_both_settings(backbone, load_task):
  """The judge of generated text (quality.json, the classifier filter) is selected on every intent even
  when the grid's downstream runs use source data, which select on the general intents alone: one
  quality.json serves both settings."""
  from ml_collections import ConfigDict
  from msp_jax import experiment
  task = load_task("nlupp", "hotels", "few_shot")
  dev = list(task.splits["dev"])[:12]
  cache = task_models.FeatureCache(backbone)
  c = ConfigDict({"downstream_hidden": 0, "downstream_steps": 20, "downstream_l2": (1e-3,), "downstream_eval_every": 10,
                  "downstream_thresholds": (0.3, 0.5), "seed": 0, "source_data": False})
  judges = {}
  for source in (False, True):
    c.source_data = source
    judges[source], scores = experiment.fit_judge("nlupp", task, cache, c, dev)
  assert judges[True].selection == judges[False].selection and judges[True].selection["intents"]["dev_metric"] == "micro_f1"
  assert c.source_data  # the grid's own config is left as it was
