"""Consistency filtering of generated pools: the classifier judge's threshold (dev only), its drop and
relabel actions, and the round trip's scores (against log-probabilities computed by hand) and ranking."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from msp_jax import assembly, consistency, experiment, task_models, training
from msp_jax import prompts as soft_prompts
from msp_jax.data import BatchConfig, PromptLayout, make_batch


class LabelFeatures:
  """A stand-in feature extractor whose features are the gold intents of each text: separable."""

  def __init__(self, examples, labels, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    self.features = {ex.text: np.array([float(n in ex.attributes["intents"]) for n in labels]) for ex in examples}
    self.features = {t: f + noise * rng.normal(size=f.shape) for t, f in self.features.items()}

  def sentence(self, texts):
    return np.stack([self.features[t] for t in texts])


def judge_config(**extra):
  c = ConfigDict({"downstream_hidden": 0, "downstream_steps": 200, "downstream_l2": (1e-3,), "downstream_eval_every": 200,
                  "downstream_thresholds": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), "seed": 0,
                  "consistency_filter": "classifier", "consistency_action": "drop", "consistency_recall": 0.9})
  c.update(extra)
  return c


def test_recall_threshold_is_the_highest_that_keeps_the_target_recall():
  gold = np.array([0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.15, 0.05])  # recall(t) = share above t
  grid = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  assert consistency.recall_threshold(gold, grid, 0.6) == pytest.approx((0.4, 0.6))  # 6 of 10 above 0.4
  assert consistency.recall_threshold(gold, grid, 0.5) == pytest.approx((0.5, 0.5))
  assert consistency.recall_threshold(gold, grid, 0.1) == pytest.approx((0.9, 0.1))
  assert consistency.recall_threshold(gold, grid[::-1], 0.3) == pytest.approx((0.7, 0.3))  # grid order does not matter
  assert consistency.recall_threshold(gold, grid, 0.95) == pytest.approx((0.1, 0.9))  # none reaches it: the lowest


def test_thresholds_are_chosen_on_dev_only(load_task):
  """The judge and its thresholds from a task whose test labels are shuffled are exactly the same."""
  task = load_task("nlupp", "hotels", "few_shot")
  dev = list(task.splits["dev"])
  test = list(task.splits["test"])
  labels = list(task.ontology["intents"].names)
  cache = LabelFeatures(list(task.splits["train"]) + dev + test, labels, noise=0.6)  # noisy: thresholds differ
  order = np.random.default_rng(1).permutation(len(test))
  shuffled = dataclasses.replace(task, splits={**task.splits, "test": tuple(
      dataclasses.replace(ex, attributes=test[j].attributes) for ex, j in zip(test, order))})
  assert [ex.attributes for ex in shuffled.splits["test"]] != [ex.attributes for ex in test]
  chosen = {}
  for name, t in (("real", task), ("shuffled", shuffled)):
    judge, _ = experiment.fit_judge("nlupp", t, cache, judge_config(), dev)
    chosen[name] = experiment.consistency_thresholds(judge, dev, judge_config())
  assert chosen["real"] == chosen["shuffled"]
  intents = chosen["real"]["intents"]
  assert intents["threshold"] in judge_config().downstream_thresholds and intents["dev_recall"] >= 0.9
  assert intents["dev_attributes"] == sum(len(ex.attributes["intents"]) for ex in dev[1::2])  # the held-out half
  assert experiment.consistency_thresholds(judge, dev, judge_config(consistency_filter="roundtrip")) is None


@pytest.fixture(scope="module")
def hotel_judge(load_task):
  task = load_task("nlupp", "hotels", "few_shot")
  train, dev = list(task.splits["train"]), list(task.splits["dev"])
  cache = LabelFeatures(train + dev, list(task.ontology["intents"].names))
  judge = task_models.IntentModel(task, cache, judge_config(), 0).fit([experiment.example_record(ex) for ex in train], dev)
  return task, judge


def test_classifier_filter_drops_or_relabels_records_the_judge_disagrees_with(hotel_judge):
  """Texts whose features are their gold intents: a record requesting its text's gold intents passes,
  one requesting intents the text does not have fails (dropped, or relabelled to the text's gold)."""
  task, judge = hotel_judge
  train = [ex for ex in task.splits["train"] if ex.attributes["intents"]]
  probs = judge.probabilities([ex.text for ex in train])["intents"]
  labels = judge.labels["intents"]
  gold = np.array([[n in ex.attributes["intents"] for n in labels] for ex in train])
  assert probs[gold].min() > 0.5 > probs[~gold].max()  # the toy's probabilities: known on either side of 0.5
  a, b = train[0], next(ex for ex in train if not set(ex.attributes["intents"]) & set(train[0].attributes["intents"]))
  records = [
      {"text": a.text, "attributes": {"intents": list(a.attributes["intents"])}, "spans": []},  # consistent
      {"text": a.text, "attributes": {"intents": list(b.attributes["intents"])}, "spans": []},  # b's intents: not a's
      {"text": b.text, "attributes": {"intents": list(b.attributes["intents"]) + list(a.attributes["intents"])},
       "spans": []},  # one more intent than the text has
      {"text": b.text, "attributes": {"intents": []}, "spans": []}]  # nothing requested: nothing to contradict
  thresholds = {"intents": {"threshold": 0.5}}
  kept, counts = consistency.classifier_filter(records, judge, thresholds, "drop")
  assert kept == [records[0], records[3]] and (counts["dropped"], counts["relabelled"]) == (2, 0)
  # nearest to passing first: record 2 lacks one intent (its own are confident), record 1 lacks all of them
  assert counts["rejected"] == [records[2], records[1]]
  kept, counts = consistency.classifier_filter(records, judge, thresholds, "relabel")
  assert (counts["dropped"], counts["relabelled"], counts["rejected"]) == (0, 2, [])
  assert [sorted(r["attributes"]["intents"]) for r in kept] == [
      sorted(a.attributes["intents"]), sorted(a.attributes["intents"]), sorted(b.attributes["intents"]), []]
  assert [r.get("relabelled", False) for r in kept] == [False, True, True, False]
  # a threshold above every probability leaves a failing record nothing: relabelling drops it too
  kept, counts = consistency.classifier_filter(records, judge, {"intents": {"threshold": 1.0}}, "relabel")
  assert kept == [records[3]] and (counts["dropped"], counts["relabelled"]) == (3, 0)


def test_a_pool_left_short_is_filled_back_with_the_rejects_nearest_to_passing(hotel_judge):
  """The grid's filter step: with a target above what passes, the shortfall comes back from the rejected
  records in the classifier's order, and the counts say so; with a target it can meet, nothing comes back."""
  task, judge = hotel_judge
  train = [ex for ex in task.splits["train"] if ex.attributes["intents"]]
  a, b = train[0], next(ex for ex in train if not set(ex.attributes["intents"]) & set(train[0].attributes["intents"]))
  records = [{"text": a.text, "attributes": {"intents": list(a.attributes["intents"])}, "spans": []},
             {"text": a.text, "attributes": {"intents": list(b.attributes["intents"])}, "spans": []},
             {"text": b.text, "attributes": {"intents": list(b.attributes["intents"]) + list(a.attributes["intents"])},
              "spans": []}]
  c = judge_config()
  thresholds = {"intents": {"threshold": 0.5}}
  kept, counts = experiment.consistent_records(c, None, None, "attention", records, judge, thresholds, target=2, which="classifier")
  assert kept == [records[0], records[2]] and (counts["pool"], counts["dropped_classifier"], counts["filled"], counts["kept"]) == (3, 2, 1, 2)
  kept, counts = experiment.consistent_records(c, None, None, "attention", records, judge, thresholds, target=1, which="classifier")
  assert kept == [records[0]] and (counts["filled"], counts["kept"]) == (0, 1)


def test_relabelling_drops_the_spans_of_types_no_longer_there():
  record = {"text": "Ada met Bob in Paris", "attributes": {"entities": ["person", "location"]},
            "spans": [{"type": "person", "value": "Ada", "start": 0, "end": 3},
                      {"type": "location", "value": "Paris", "start": 15, "end": 20}]}
  out = consistency.relabelled(record, {"entities": ["person"]})
  assert out["attributes"] == {"entities": ["person"]} and [s["value"] for s in out["spans"]] == ["Ada"]
  assert record["attributes"]["entities"] == ["person", "location"]  # the pool's record is left as it was


@pytest.mark.parametrize("scores,ranks", [
    ([[-1.0, -2.0, -3.0], [-2.0, -1.0, -3.0], [-1.0, -1.0, -5.0], [-4.0, -1.0, -2.0], [-3.0]],
     [1, 2, 2, 3, 1])])
def test_roundtrip_rank_counts_alternatives_at_least_as_likely(scores, ranks):
  assert consistency.roundtrip_ranks(scores).tolist() == ranks
  records = [{"i": i} for i in range(len(scores))]
  # dropped: the best-ranked first (ties in pool order)
  assert consistency.roundtrip_filter(records, scores, 1) == ([records[0], records[4]], [records[1], records[2], records[3]])
  assert consistency.roundtrip_filter(records, scores, 2) == ([records[0], records[1], records[2], records[4]], [records[3]])


def test_roundtrip_scores_are_the_summed_log_probabilities_of_the_text(tiny_model_dir, load_task):
  from msp_jax.models.weights import load_backbone
  backbone = load_backbone(tiny_model_dir)
  tok = backbone.tokenizer
  task = load_task("nlupp", "hotels", "few_shot")
  seeds = list(task.splits["train"])[:6]
  rng = np.random.default_rng(0)
  d = assembly.embedding_table(backbone.model).shape[-1]
  banks = {s.name: rng.normal(size=(len(s), 3, d)) for s in task.ontology.sets}
  prompts = soft_prompts.SoftPrompts(rng.normal(size=(2, d)), banks, "attention", rngs=nnx.Rngs(0))
  model = training.PromptedModel(backbone.model, prompts, encoder_decoder=False)
  layout = PromptLayout(task.ontology, task.splits["train"], 2)
  config = BatchConfig(buckets=(64, 128, 256, 512), max_mixture=10)
  dev = list(task.splits["dev"])[:2]

  @nnx.jit
  def forward(model, batch):  # the backbone's logits of one row behind its prompts (jitted: eager is slow)
    prefix, prefix_mask = model.prefix(batch)
    return model.backbone(batch["input_ids"], batch["attention_mask"], embedded_prefix=prefix, prefix_mask=prefix_mask)

  records = [{"text": ex.text, "attributes": {"intents": list(ex.attributes["intents"])}, "values": list(ex.values),
              "domain": ex.domain} for ex in dev]
  scores = consistency.roundtrip_scores(records, model, tok, config, layout, seeds, 2, seed=5, batch_size=4)
  sets = consistency.attribute_sets(records, seeds, 2, 5)
  for i, (r, row, own_and_others) in enumerate(zip(records, scores, sets)):
    assert len(row) == 3 and own_and_others[0][0] == r["attributes"]
    seed_sets = [{s: list(n) for s, n in ex.attributes.items()} for ex in seeds]
    keys = lambda a: frozenset((s, n) for s, names in a.items() for n in names)
    others = [keys(a) for a, _ in own_and_others[1:]]
    assert len(set(others)) == 2 and keys(r["attributes"]) not in others
    assert all(o in {keys(a) for a in seed_sets} for o in others)
    for j, segment in enumerate(consistency.roundtrip_segments(r, own_and_others, layout, 5, i)):
      assert segment.target == r["text"] and segment.attribute_ids == task.ontology.ids(own_and_others[j][0])
      batch = {k: jax.numpy.asarray(v) for k, v in make_batch([segment], tok, config).items() if k in training.MODEL_KEYS}
      ids = np.asarray(batch["input_ids"][0])
      real = np.asarray(batch["attention_mask"][0]).astype(bool)
      logits = forward(model, batch)
      logp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1))
      target = tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
      end = int(np.flatnonzero(real)[-1]) + 1  # the one row has no padding after its EOS
      assert ids[end - len(target):end].tolist() == target
      by_hand = sum(logp[t - 1, ids[t]] for t in range(end - len(target), end))  # logits[t - 1] predict token t
      assert row[j] == pytest.approx(by_hand, rel=1e-4, abs=1e-3), (i, j)


class TagFeatures:
  """Per-word features that are each word's gold BIO tag, one-hot: a tagger learns them exactly."""

  def __init__(self, examples, tags):
    from msp_jax.data.spans import example_bio_tags
    self.words = {ex.text: np.eye(len(tags))[[tags.index(t) for t in example_bio_tags(ex)]] for ex in examples}

  def per_word(self, texts):
    return [self.words[t] for t in texts]


def test_tagger_filter_passes_records_whose_requested_types_it_finds(load_task):
  """CrossNER: the judge is the BIO tagger; a record passes when the tagger finds every requested entity
  type in its text; relabelling keeps the requested types it finds (and their spans)."""
  task = load_task("crossner", "music", "few_shot")
  train, dev = list(task.splits["train"]), list(task.splits["dev"])
  tags = task_models.bio_labels(list(task.ontology["entities"].names))
  c = judge_config(mask_synthetic_o=False, downstream_steps=300, downstream_eval_every=300)
  judge = task_models.EntityModel(task, TagFeatures(train + dev, tags), c, 0).fit(
      [experiment.example_record(ex) for ex in train], dev)
  chosen = consistency.choose_thresholds(judge, dev[1::2], c.downstream_thresholds, 0.9)
  gold = sum(len(set(ex.attributes["entities"])) for ex in dev[1::2])
  assert chosen["entities"]["threshold"] is None and chosen["entities"]["dev_attributes"] == gold
  assert chosen["entities"]["dev_recall"] >= 0.99  # (a type the few-shot seeds never show cannot be learned)
  ex = next(e for e in train if len(set(e.attributes["entities"])) >= 2)
  absent = next(t for t in task.ontology["entities"].names if t not in ex.attributes["entities"])
  record = experiment.example_record(ex)
  asked_more = dict(record, attributes={"entities": sorted(ex.attributes["entities"]) + [absent]})
  kept, counts = consistency.classifier_filter([record, asked_more], judge, chosen, "drop")
  assert kept == [record] and (counts["dropped"], counts["relabelled"], counts["rejected"]) == (1, 0, [asked_more])
  kept, counts = consistency.classifier_filter([record, asked_more], judge, chosen, "relabel")
  assert (counts["dropped"], counts["relabelled"]) == (0, 1)
  assert sorted(kept[1]["attributes"]["entities"]) == sorted(ex.attributes["entities"]) and kept[1]["spans"] == record["spans"]
