"""The grid's downstream models: a task's labels learned from frozen-backbone features, with every
hyper-parameter chosen on the real dev split and the test split scored once.

  NLU++      IntentModel: a multi-label intent head on mean-pooled states
  CrossNER   EntityModel: a per-word BIO tagger on first-sub-token states
  TOPv2      ParseModel: multi-label intent and slot-type heads (not exact-match semantic parsing)
  files      AttributeSetsModel (one multi-label head per set) or EntityModel (seeds with spans)

With `c.downstream = "finetune"` (NLU++ and CrossNER), the original MSP code's protocol instead: the
backbone writes each utterance's label string (label_generator.py), its epoch chosen on dev.

Each takes records ({"text", "attributes", "spans"}; "synthetic": True marks generated ones) and dev
`Example`s in `fit`, and test `Example`s in `score`. The heads themselves are `downstream.py`.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from msp_jax import downstream, features, label_generator
from msp_jax.data import user_files
from msp_jax.data.splits import seeded_sample
from msp_jax.data.spans import bio_labels, bio_tags, example_bio_tags
from msp_jax.errors import MspError
from msp_jax.metrics import task_scores


class SelectionError(MspError):
  """A selection grid (L2 penalties, eval interval, thresholds) that cannot be searched."""


class FeatureCache:
  """Backbone features of each text computed once per process (the grid reuses the test split and seeds)."""

  def __init__(self, backbone):
    self.backbone, self.pooled, self.words = backbone, {}, {}

  def sentence(self, texts) -> np.ndarray:
    new = sorted({t for t in texts if t not in self.pooled})
    if new:
      self.pooled.update(zip(new, features.text_embeddings(self.backbone, new)))
    return np.stack([self.pooled[t] for t in texts])

  def per_word(self, texts) -> list[np.ndarray]:
    new = sorted({t for t in texts if t not in self.words})
    if new:
      self.words.update(zip(new, features.token_features(self.backbone, new)))
    return [self.words[t] for t in texts]


class LabelSetModel:
  """Multi-label heads on pooled features, one per attribute set (`attribute_sets`)."""
  attribute_sets: tuple = ()

  def __init__(self, task, cache: FeatureCache, c, seed: int):
    self.labels = {s: list(task.ontology[s].names) for s in self.attribute_sets}
    self.cache, self.c, self.seed = cache, c, seed

  selection_metric = {"intents": "micro_f1", "slots": "micro_f1"}  # each head's dev score

  def dev_columns(self, s: str) -> tuple[list[int] | None, str | None]:
    """(the label columns head `s` is selected on, the score's name): all of them, by default."""
    return None, None

  def fit(self, records, dev):
    """Train on records; L2, steps and threshold of each head chosen on the dev Examples."""
    x, x_dev = self.cache.sentence([r["text"] for r in records]), self.cache.sentence([ex.text for ex in dev])
    self.models = {s: downstream.MultiLabelClassifier(hidden=self.c.downstream_hidden, steps=self.c.downstream_steps,
                                                      seed=self.seed).fit_selected(
                          x, downstream.intent_targets(records, labels, s), x_dev, downstream.intent_targets(dev, labels, s),
                          selection_grid(self.c), self.selection_metric[s], *self.dev_columns(s))
                   for s, labels in self.labels.items()}
    return self

  @property
  def selection(self) -> dict:
    return {s: m.selection for s, m in self.models.items()}

  def predict(self, texts) -> dict[str, list[set]]:
    x = self.cache.sentence(texts)
    return {s: [{labels[j] for j in np.flatnonzero(row)} for row in self.models[s].predict(x)]
            for s, labels in self.labels.items()}

  def probabilities(self, texts) -> dict[str, np.ndarray]:
    """{set: [N, L] probability of each of its labels} (`labels[set]` order)."""
    x = self.cache.sentence(texts)
    return {s: self.models[s].probabilities(x) for s in self.labels}

  def predict_keys(self, texts) -> list[set]:
    pred = self.predict(texts)
    return [{(s, n) for s in self.attribute_sets for n in pred[s][i]} for i in range(len(texts))]


class IntentModel(LabelSetModel):
  """NLU++: multi-label intents from pooled features."""
  attribute_sets = ("intents",)

  def __init__(self, task, cache: FeatureCache, c, seed: int):
    super().__init__(task, cache, c, seed)
    self.general = {a.name for a in task.ontology["intents"].attributes if a.general}

  def dev_columns(self, s: str) -> tuple[list[int] | None, str | None]:
    """Domain adaptation (`source_data`) is scored on the general intents (the original's cross-domain
    metric, `general_intent_f1`), so it is selected on them too; few-shot on every intent."""
    if not self.c.get("source_data"):
      return None, None
    return [j for j, n in enumerate(self.labels[s]) if n in self.general], "general_intent_f1"

  def predict_unmatched(self, texts) -> tuple[list[set], list[int] | None]:
    """Predicted intents, and per text how many predictions named no intent (a head predicts none such)."""
    return self.predict(texts)["intents"], None

  def score(self, examples) -> dict:
    """Standard micro/macro F1, and the original code's per-utterance formulas (all intents, and its
    cross-domain general-intent restriction) beside the standard micro F1 on that restriction."""
    gold = [set(ex.attributes["intents"]) for ex in examples]
    pred, unmatched = self.predict_unmatched([ex.text for ex in examples])
    prf = task_scores.multilabel_prf(gold, pred, self.labels["intents"], unmatched)
    return {"micro_f1": prf["micro_f1"], "macro_f1": prf["macro_f1"], "micro_precision": prf["micro_precision"],
            "micro_recall": prf["micro_recall"],
            "intent_f1_original": task_scores.intent_f1_original(gold, pred, unmatched=unmatched)["f1"],
            "general_intent_f1": task_scores.general_intent_f1(gold, pred, self.general),
            "general_intent_f1_original": task_scores.intent_f1_original(gold, pred, self.general)["f1"]}


class EntityModel:
  """CrossNER: a per-word BIO tagger on word features."""
  attribute_sets = ("entities",)

  def __init__(self, task, cache: FeatureCache, c, seed: int):
    self.types = list(task.ontology["entities"].names)
    self.tags = bio_labels(self.types)
    self.cache, self.c, self.seed = cache, c, seed

  def fit(self, records, dev):
    """Train on records; L2 and steps chosen by span F1 on the dev Examples. With `mask_synthetic_o`, the
    "O" words of synthetic records are out of the loss: a generated sentence that leaves out a requested
    value or names an unrequested entity would otherwise teach "O" for an entity."""
    texts = [r["text"] for r in records]
    index = {t: i for i, t in enumerate(self.tags)}
    tags = [[index[t] for t in bio_tags(r["text"], r["spans"] or [])] for r in records]
    dev_tags = [[index[t] for t in example_bio_tags(ex)] for ex in dev]
    mask = None
    if self.c.get("mask_synthetic_o") and any(r.get("synthetic") for r in records):
      mask = [[not (r.get("synthetic") and t == index["O"]) for t in row] for r, row in zip(records, tags)]
    self.model = downstream.BIOTagger(tags=self.tags, hidden=self.c.downstream_hidden, steps=tagger_steps(self.c),
                                      batch_size=tagger_batch_size(self.c), seed=self.seed).fit_selected(self.cache.per_word(texts), tags,
                                                                   self.cache.per_word([ex.text for ex in dev]), dev_tags,
                                                                   selection_grid(self.c, tagger=True), mask)
    return self

  @property
  def selection(self) -> dict:
    return {"entities": self.model.selection}

  def predict_spans(self, texts) -> list[list]:
    return [task_scores.bio_to_spans([self.tags[i] for i in row]) for row in self.model.predict(self.cache.per_word(texts))]

  def predict_keys(self, texts) -> list[set]:
    return [{("entities", t) for t, _, _ in spans} for spans in self.predict_spans(texts)]

  def score(self, examples) -> dict:
    """Standard exact span F1, and the original code's partial-match F1 on the entity strings."""
    gold = [task_scores.bio_to_spans(example_bio_tags(ex)) for ex in examples]  # raises if a gold value is not in its text
    pred = self.predict_spans([ex.text for ex in examples])
    exact = task_scores.span_f1(gold, pred)
    partial = task_scores.span_partial_f1_original([task_scores.span_texts(ex.text, g) for ex, g in zip(examples, gold)],
                                                   [task_scores.span_texts(ex.text, p) for ex, p in zip(examples, pred)])
    return {"span_f1": exact["f1"], "span_precision": exact["precision"], "span_recall": exact["recall"],
            "span_partial_f1_original": partial["f1"]}


def epoch_report(c, metric: str) -> Callable[[dict], None]:
  """Prints one line per finetuning epoch (a run takes minutes on a CPU)."""
  def report(h: dict) -> None:
    print(f"  finetune epoch {h['epoch']}/{c.finetune_epochs}: train loss {h['train_loss']:.3f}, dev {metric} "
          f"{h['dev_score']:.3f} ({h['train_seconds']:.0f} s training, {h['dev_seconds']:.0f} s decoding dev)", flush=True)
  return report


def epoch_choice_dev(c, dev: list) -> list:
  """The dev examples a finetune run's epoch is chosen on: all of them, or with `finetune_dev_max` = n a
  seeded sample of n (the same examples for every method and seed), in dev order. Decoding CrossNER politics' 541 dev
  sentences after each of 7 epochs is about 40% of a row's hours on a CPU."""
  n = c.get("finetune_dev_max", 0)
  return seeded_sample(dev, n, 0) if n else dev


def finetune_config(c, seed: int) -> label_generator.FinetuneConfig:
  return label_generator.FinetuneConfig(params=c.finetune_params, epochs=c.finetune_epochs, learning_rate=c.finetune_lr,
                                        batch_size=c.finetune_batch_size, max_new_tokens=c.finetune_max_new_tokens,
                                        repetition_penalty=c.finetune_repetition_penalty,
                                        group_by_length=c.get("finetune_group_by_length", False), seed=seed)


class GeneratedIntentModel(IntentModel):
  """NLU++, the original's protocol: the backbone (its soft prompt, or all of it) learns to write the
  ";"-joined intents; the epoch is chosen on the parsed dev strings by the score the setting is ranked by
  (micro F1; with `source_data`, general_intent_f1). Scored like IntentModel; a written piece that names
  no intent is a false positive, as in the original's scoring."""

  def fit(self, records, dev, checkpoint_dir: str | None = None):
    self.strings = label_generator.IntentStrings(self.labels["intents"])
    self.generator = label_generator.LabelGenerator(self.cache.backbone, finetune_config(self.c, self.seed))
    dev = epoch_choice_dev(self.c, dev)
    gold = [set(ex.attributes["intents"]) for ex in dev]
    self.dev_metric = self.dev_columns("intents")[1] or "micro_f1"

    def dev_score(strings):
      pred, unmatched = self.parse(strings)
      if self.dev_metric == "general_intent_f1":
        return task_scores.general_intent_f1(gold, pred, self.general)
      return task_scores.multilabel_prf(gold, pred, self.labels["intents"], unmatched)["micro_f1"]

    self.generator.fit([r["text"] for r in records], [self.strings.format(r["attributes"].get("intents", ())) for r in records],
                       [ex.text for ex in dev], dev_score, epoch_report(self.c, self.dev_metric), checkpoint_dir,
                       {"dev_metric": self.dev_metric, "dev_gold": [sorted(g) for g in gold]})
    return self

  @property
  def selection(self) -> dict:
    return {"intents": {**self.generator.selection, "dev_metric": self.dev_metric}}

  def parse(self, strings) -> tuple[list[set], list[int]]:
    parsed = [self.strings.parse(s) for s in strings]
    self.dropped = sum(n for _, n in parsed)  # label pieces of the last prediction that named no intent
    return [labels for labels, _ in parsed], [n for _, n in parsed]

  def predict_unmatched(self, texts) -> tuple[list[set], list[int]]:
    return self.parse(self.generator.generate(texts))

  def predict(self, texts) -> dict[str, list[set]]:
    return {"intents": self.predict_unmatched(texts)[0]}


def located(texts, written) -> list[list]:
  """The word spans of each text's written entities (`label_generator.locate`)."""
  return [label_generator.locate(t, e) for t, e in zip(texts, written)]


class GeneratedEntityModel(EntityModel):
  """CrossNER, the original's protocol: the backbone learns to write "entity [type] <sep> ..."; the epoch
  is chosen by exact span F1 on dev. Exact span F1 needs word offsets: each written entity is found in
  the sentence (`label_generator.locate`), one that is not there is a false positive; the original's
  partial-match score reads the written strings themselves."""

  def fit(self, records, dev, checkpoint_dir: str | None = None):
    self.strings = label_generator.EntityStrings(self.types)
    self.generator = label_generator.LabelGenerator(self.cache.backbone, finetune_config(self.c, self.seed))
    dev = epoch_choice_dev(self.c, dev)
    gold = [task_scores.bio_to_spans(example_bio_tags(ex)) for ex in dev]
    texts = [ex.text for ex in dev]

    def dev_score(strings):
      written, unmatched = self.written(strings)
      return task_scores.span_f1(gold, located(texts, written), unmatched)["f1"]

    targets = [self.strings.format([(s["type"], s["value"]) for s in sorted(r["spans"] or [], key=lambda s: s["start"])])
               for r in records]
    self.generator.fit([r["text"] for r in records], targets, texts, dev_score, epoch_report(self.c, "span_f1"), checkpoint_dir,
                       {"dev_metric": "span_f1", "dev_gold": gold})
    return self

  @property
  def selection(self) -> dict:
    return {"entities": {**self.generator.selection, "dev_metric": "span_f1"}}

  def written(self, strings) -> tuple[list[list[tuple[str, str]]], list[int]]:
    """The entities each string names, and how many of its pieces were not "entity [known type]"."""
    parsed = [self.strings.parse(s) for s in strings]
    self.dropped = sum(n for _, n in parsed)  # pieces of the last prediction that were not "entity [known type]"
    return [entities for entities, _ in parsed], [n for _, n in parsed]

  def predict_spans(self, texts) -> list[list]:
    return located(texts, self.written(self.generator.generate(texts))[0])

  def score(self, examples) -> dict:
    """EntityModel's scores: exact span F1 on the located entities, the original's partial F1 on the
    written ones; a malformed piece is a false positive of both, as in the original's scoring."""
    gold = [task_scores.bio_to_spans(example_bio_tags(ex)) for ex in examples]
    texts = [ex.text for ex in examples]
    written, unmatched = self.written(self.generator.generate(texts))
    exact = task_scores.span_f1(gold, located(texts, written), unmatched)
    partial = task_scores.span_partial_f1_original([task_scores.span_texts(ex.text, g) for ex, g in zip(examples, gold)],
                                                   written, unmatched)
    return {"span_f1": exact["f1"], "span_precision": exact["precision"], "span_recall": exact["recall"],
            "span_partial_f1_original": partial["f1"]}


class ParseModel(LabelSetModel):
  """TOPv2: multi-label intents and multi-label slot types from pooled features, two linear heads.
  Plainly not TOPv2's exact-match semantic parsing (no tree, no slot values)."""
  attribute_sets = ("intents", "slots")
  selection_metric = {"intents": "set_accuracy", "slots": "micro_f1"}  # the intents head by the main metric

  def score(self, examples) -> dict:
    pred = self.predict([ex.text for ex in examples])
    gold = {s: [set(ex.attributes[s]) for ex in examples] for s in self.attribute_sets}
    intents = task_scores.multilabel_prf(gold["intents"], pred["intents"], self.labels["intents"])
    slots = task_scores.multilabel_prf(gold["slots"], pred["slots"], self.labels["slots"])
    return {"intent_set_accuracy": task_scores.intent_set_accuracy(gold["intents"], pred["intents"]),
            "intent_micro_f1": intents["micro_f1"], "slot_type_micro_f1": slots["micro_f1"],
            "slot_type_macro_f1": slots["macro_f1"]}


class AttributeSetsModel(LabelSetModel):
  """A files dataset without entity spans: one multi-label head per attribute set, each chosen by micro F1."""

  def __init__(self, task, cache: FeatureCache, c, seed: int):
    self.attribute_sets = task.ontology.set_names
    self.selection_metric = {s: "micro_f1" for s in self.attribute_sets}
    super().__init__(task, cache, c, seed)

  def score(self, examples) -> dict:
    """Micro F1 over every (set, attribute) label, and micro / macro F1 per set."""
    pred = self.predict([ex.text for ex in examples])
    out = {"micro_f1": task_scores.attribute_prf([ex.keys() for ex in examples], self.predict_keys([ex.text for ex in examples]))["f1"]}
    for s in self.attribute_sets:
      prf = task_scores.multilabel_prf([set(ex.attributes[s]) for ex in examples], pred[s], self.labels[s])
      out.update({f"{s}_micro_f1": prf["micro_f1"], f"{s}_macro_f1": prf["macro_f1"]})
    return out


MODELS = {"nlupp": IntentModel, "crossner": EntityModel, "topv2": ParseModel}
FINETUNE_MODELS = {"nlupp": GeneratedIntentModel, "crossner": GeneratedEntityModel}
DOWNSTREAM = ("probe", "finetune")
MAIN_METRIC = {"nlupp": "micro_f1", "crossner": "span_f1", "topv2": "intent_set_accuracy"}


def model_class(task):
  """The benchmark's downstream model; for a files dataset, the BIO tagger when its seeds have entity
  spans (set "entities"), else one multi-label head per attribute set."""
  if task.dataset in MODELS:
    return MODELS[task.dataset]
  tagged = any(ex.spans for ex in task.splits["train"]) and user_files.ENTITIES in task.ontology.set_names
  return EntityModel if tagged else AttributeSetsModel


def main_metric(task) -> str:
  return MAIN_METRIC.get(task.dataset) or ("span_f1" if model_class(task) is EntityModel else "micro_f1")


def selection_grid(c, tagger: bool = False) -> downstream.SelectionGrid:
  """The dev-selection grid of the intent heads, or with `tagger` of the span tagger (`tagger_l2` when set,
  and `tagger_patience`)."""
  field = "tagger_l2" if tagger and c.get("tagger_l2") else "downstream_l2"
  patience = c.get("tagger_patience", 0) if tagger else 0
  try:
    return downstream.SelectionGrid(l2=tuple(c[field]), eval_every=c.downstream_eval_every,
                                    thresholds=tuple(c.downstream_thresholds), patience=patience)
  except (ValueError, TypeError) as e:
    raise SelectionError(f"config.{field}={c[field]!r}, config.downstream_eval_every={c.downstream_eval_every!r}, "
                          f"config.downstream_thresholds={c.downstream_thresholds!r}"
                          f"{f', config.tagger_patience={patience!r}' if tagger else ''}: {e}") from None


def tagger_steps(c) -> int:
  """The span tagger's step cap: `tagger_steps`, or `downstream_steps` when 0 (as before the field existed).
  Its own because the tagger's best dev step on CrossNER lay at the intent heads' cap (README)."""
  steps = c.get("tagger_steps", 0) or c.downstream_steps
  if not _is_int(steps) or steps < 1:
    raise SelectionError(f"config.tagger_steps={c.get('tagger_steps', 0)!r}, config.downstream_steps="
                         f"{c.downstream_steps!r}: the steps must be an integer >= 1 (tagger_steps 0: downstream_steps)")
  return steps


def tagger_batch_size(c) -> int:
  """Words per step of the span tagger (0: all of them, as before the field existed)."""
  words = c.get("tagger_batch_size", 0)
  if not _is_int(words) or words < 0:
    raise SelectionError(f"config.tagger_batch_size={words!r}: must be an integer >= 0 (words per step; 0: all)")
  return words


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_selection(c) -> None:
  """Raises the one-line error of a bad selection grid or step cap, heads' or tagger's."""
  selection_grid(c), selection_grid(c, tagger=True), tagger_steps(c), tagger_batch_size(c)


def check_downstream(c, datasets) -> None:
  """Refuses a downstream setting that cannot run on these datasets, before anything is loaded."""
  kind = c.get("downstream", "probe")
  if kind not in DOWNSTREAM:
    raise SelectionError(f"config.downstream={kind!r}: valid: {', '.join(DOWNSTREAM)}")
  if kind == "finetune":
    unsupported = [d for d in datasets if d not in FINETUNE_MODELS]
    if unsupported:
      raise SelectionError(f"config.downstream='finetune' writes NLU++ and CrossNER label strings only; config.tasks has "
                           f"{unsupported[0]}: use config.downstream='probe' for it")
    finetune_config(c, 0).check()
    dev_max = c.get("finetune_dev_max", 0)
    if not isinstance(dev_max, int) or dev_max < 0:
      raise SelectionError(f"config.finetune_dev_max={dev_max!r}: must be an integer >= 0 (0: the whole dev split)")


def dev_score(selection: dict) -> float:
  """A fitted model's dev score: the mean over its heads of the score each head was selected by."""
  return float(np.mean([chosen["dev_score"] for chosen in selection.values()]))


def fit_on_dev(task, cache, c, seed: int, candidates: dict[str, list], dev,
               state_dir: str | None = None) -> tuple[str, object, dict[str, float]]:
  """A model per candidate training set (e.g. a synthetic pool with and without a consistency filter), each
  with its hyper-parameters chosen on dev; (the name of the one with the best dev score (`dev_score`; a tie
  goes to the first), its model, every candidate's dev score). A finetune model saves each epoch in
  `{state_dir}/{candidate}` when `state_dir` is given, and resumes from there."""
  finetune = c.get("downstream", "probe") == "finetune"
  kind = FINETUNE_MODELS[task.dataset] if finetune else model_class(task)
  saved = lambda name: {"checkpoint_dir": os.path.join(state_dir, name or "all")} if finetune and state_dir else {}
  fitted = {name: kind(task, cache, c, seed).fit(records, dev, **saved(name)) for name, records in candidates.items()}
  on_dev = {name: dev_score(model.selection) for name, model in fitted.items()}
  chosen = max(on_dev, key=on_dev.get)
  return chosen, fitted[chosen], on_dev


def downstream_run(task, cache, c, seed: int, candidates: dict[str, list], dev, test,
                   state_dir: str | None = None) -> tuple[str, dict]:
  """One downstream run: the model `fit_on_dev` chooses among the candidate training sets is scored on
  test, once; (its name, its result)."""
  chosen, model, on_dev = fit_on_dev(task, cache, c, seed, candidates, dev, state_dir)
  result = {"selection": model.selection, "scores": model.score(test)}
  if len(candidates) > 1:
    result["candidates_dev_score"] = on_dev
  if c.get("downstream", "probe") == "finetune":
    result["test_labels_dropped"] = model.dropped  # written label pieces that named no label of the ontology
  return chosen, result
