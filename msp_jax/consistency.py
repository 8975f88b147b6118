"""Over-generate, then keep what is consistent: filters of a denoised pool before the grid subsamples it.

(a) classifier: the grid's attribute judge (a task model on the real seeds, `experiment.fit_judge`) must
    give every requested attribute of a record a probability above a threshold chosen on real dev data
    (`recall_threshold`). A record that fails is dropped, or relabelled to what the judge does give
    above the threshold (`relabel`; left with no attribute, it is dropped). The CrossNER tagger has no
    per-type probability: a record passes when the tagger finds each requested entity type in its text.
(b) round trip: under the trained prompts, log p(text | its attributes) must beat the same text scored
    under `alternatives` other attribute sets drawn from the seed examples; a record is kept when its
    own set ranks within the first `rank` (`roundtrip_ranks`). The text is scored with the training
    layout: the prompt a request for that set would get (its values, exemplars retrieved for it).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from msp_jax import task_models, training
from msp_jax.data import make_batch
from msp_jax.data.layout import PromptLayout, Segments
from msp_jax.errors import MspError

FILTERS = ("none", "classifier", "roundtrip", "both")
ACTIONS = ("drop", "relabel")
FIELDS = ("consistency_action", "consistency_recall", "consistency_alternatives", "consistency_rank")  # used by a filter only


class ConsistencyError(MspError):
  pass


def candidates(c) -> list[str]:
  """The filters of `c.consistency_filter`: one, or several separated by commas, each downstream run then
  choosing among them on dev (`experiment.run`)."""
  return [x.strip() for x in str(c.get("consistency_filter", "none")).split(",")]


def validate(c) -> None:
  which = candidates(c)
  bad = [x for x in which if x not in FILTERS]
  if bad or len(set(which)) < len(which):
    raise ConsistencyError(f"config.consistency_filter={c.get('consistency_filter')!r}: "
                           f"{'unknown ' + repr(bad[0]) if bad else 'a filter named twice'}; valid: {', '.join(FILTERS)}, "
                           "or several of them separated by commas (each downstream run chooses one on dev)")
  if which == ["none"]:
    return
  if c.consistency_action not in ACTIONS:
    raise ConsistencyError(f"config.consistency_action={c.consistency_action!r}: valid: {', '.join(ACTIONS)}")
  if not 0 < c.consistency_recall <= 1:
    raise ConsistencyError(f"config.consistency_recall={c.consistency_recall}: valid: 0 < recall <= 1")
  if c.consistency_alternatives < 1 or not 1 <= c.consistency_rank <= c.consistency_alternatives:
    raise ConsistencyError(f"config.consistency_alternatives={c.consistency_alternatives}, config.consistency_rank="
                           f"{c.consistency_rank}: need alternatives >= 1 and 1 <= rank <= alternatives")


def uses_classifier(c) -> bool:
  return any(x in ("classifier", "both") for x in candidates(c))


def uses_roundtrip(c) -> bool:
  return any(x in ("roundtrip", "both") for x in candidates(c))


# --- (a) the classifier -----------------------------------------------------------------------------

def recall_threshold(gold_probabilities: np.ndarray, thresholds: Sequence[float], target: float) -> tuple[float, float]:
  """(threshold, its recall): the highest of `thresholds` at which the share of gold attributes whose
  probability is above it (the judge's recall of true labels) stays >= `target`; none does: the lowest.

  Why recall: the filter drops a record when any requested attribute falls at or below the threshold, so
  1 - recall is the share of correctly labelled attributes it would wrongly reject; the highest such
  threshold rejects the most doubtful records at that cost. (Dev F1 would choose the judge's own
  decision threshold, which trades rejecting true labels for precision the filter does not need.)"""
  p = np.asarray(gold_probabilities, np.float64).reshape(-1)
  recall = lambda t: float((p > t).mean()) if len(p) else float("nan")
  ordered = sorted(thresholds)
  chosen = next((t for t in reversed(ordered) if recall(t) >= target), ordered[0])
  return float(chosen), recall(chosen)


def choose_thresholds(judge, dev, thresholds: Sequence[float], target: float) -> dict:
  """{set: {"threshold", "dev_recall", "dev_attributes"}} from the judge's probabilities of the gold
  attributes of the dev Examples `dev` (examples its own selection did not see). The tagger: threshold
  None, its recall of the gold entity types by the types it finds."""
  texts = [ex.text for ex in dev]
  if not isinstance(judge, task_models.LabelSetModel):
    found = judge.predict_keys(texts)
    gold = [(k, i) for i, ex in enumerate(dev) for k in ex.keys() if k[0] in judge.attribute_sets]
    hits = [k in found[i] for k, i in gold]
    return {s: {"threshold": None, "dev_recall": float(np.mean(hits)) if hits else None, "dev_attributes": len(hits)}
            for s in judge.attribute_sets}
  probabilities = judge.probabilities(texts)
  out = {}
  for s, labels in judge.labels.items():
    index = {n: j for j, n in enumerate(labels)}
    gold = [probabilities[s][i, index[n]] for i, ex in enumerate(dev) for n in ex.attributes.get(s, ())]
    threshold, recall = recall_threshold(np.array(gold), thresholds, target)
    out[s] = {"threshold": threshold, "dev_recall": recall if gold else None, "dev_attributes": len(gold)}
  return out


def relabelled(record: dict, attributes: dict) -> dict:
  """The record with these judged sets' attributes; spans of types no longer among them go too."""
  attributes = {**record["attributes"], **attributes}
  kept = {n for names in attributes.values() for n in names}
  return dict(record, attributes=attributes, spans=[sp for sp in record.get("spans") or [] if sp["type"] in kept],
              relabelled=True)


def classifier_filter(records: list[dict], judge, thresholds: dict, action: str) -> tuple[list[dict], dict]:
  """(the records that pass, or relabelled ones; {"dropped", "relabelled", "rejected"}). `thresholds`:
  `choose_thresholds`'s. "rejected" lists the dropped records, the nearest to passing first: by the
  lowest margin of a requested attribute's probability over its threshold (the tagger: by the share of
  requested types it finds), so a pool left short of the target can be filled with the best of them."""
  texts = [r["text"] for r in records]
  if not records:
    return [], {"dropped": 0, "relabelled": 0, "rejected": []}
  if isinstance(judge, task_models.LabelSetModel):
    probabilities = judge.probabilities(texts)
    given = [{s: [n for j, n in enumerate(labels) if probabilities[s][i, j] > thresholds[s]["threshold"]]
              for s, labels in judge.labels.items()} for i in range(len(records))]
    index = {s: {n: j for j, n in enumerate(labels)} for s, labels in judge.labels.items()}
    margin = [min((probabilities[s][i, index[s][n]] - thresholds[s]["threshold"]
                   for s in judge.labels for n in r["attributes"].get(s, ()) if n in index[s]), default=0.0)
              for i, r in enumerate(records)]
  else:  # the tagger: the requested types it finds (it gives no probability per type)
    found = judge.predict_keys(texts)
    given = [{s: [n for n in r["attributes"].get(s, ()) if (s, n) in found[i]] for s in judge.attribute_sets}
             for i, r in enumerate(records)]
    margin = [np.mean([n in g[s] for s in judge.attribute_sets for n in r["attributes"].get(s, ())] or [1.0])
              for r, g in zip(records, given)]
  kept, rejected, changed = [], [], 0
  for i, (r, g) in enumerate(zip(records, given)):
    if all(set(r["attributes"].get(s, ())) <= set(g[s]) for s in judge.attribute_sets):
      kept.append(r)
    elif action == "relabel" and any(g.values()):
      kept.append(relabelled(r, g))
      changed += 1
    else:
      rejected.append(i)
  rejected.sort(key=lambda i: -margin[i])  # stable: ties keep the pool's order
  return kept, {"dropped": len(rejected), "relabelled": changed, "rejected": [records[i] for i in rejected]}


# --- (b) the round trip -----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _text_log_probs(graphdef, state, batch):
  nll, mask = nnx.merge(graphdef, state).token_losses(batch)
  return -(nll * mask).sum(1)


def text_log_probs(model: training.PromptedModel, tokenizer, batch_config, segments: Sequence[Segments],
                   batch_size: int) -> np.ndarray:
  """[N] summed log-probability of each segment's target tokens and end of text (the tokens the training
  loss scores) under `model`; batches of `batch_size` rows, the last one padded (one shape per bucket)."""
  graphdef, state = nnx.split(model)
  out = []
  for start in range(0, len(segments), batch_size):
    chunk = list(segments[start:start + batch_size])
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    batch = {k: v for k, v in make_batch(padded, tokenizer, batch_config).items() if k in training.MODEL_KEYS}
    out.append(np.asarray(_text_log_probs(graphdef, state, batch))[:len(chunk)])
  return np.concatenate(out) if out else np.zeros(0, np.float32)


def attribute_sets(records: list[dict], seeds, alternatives: int, seed: int) -> list[list[tuple[dict, tuple]]]:
  """Per record: (attributes, values) of its own set, then up to `alternatives` other sets of the seed
  examples (distinct, none equal to its own), drawn with `seed` and the record's position."""
  pool, seen = [], set()
  for ex in seeds:
    key = frozenset(ex.keys())
    if key not in seen:
      seen.add(key)
      pool.append((key, {s: list(n) for s, n in ex.attributes.items()}, tuple(ex.values)))
  out = []
  for i, r in enumerate(records):
    own = frozenset((s, n) for s, names in r["attributes"].items() for n in names)
    others = [p for p in pool if p[0] != own]
    rng = np.random.default_rng([seed, 13, i])
    chosen = rng.choice(len(others), min(alternatives, len(others)), replace=False) if others else []
    out.append([(r["attributes"], tuple(r.get("values") or ()))] + [others[j][1:] for j in chosen])
  return out


def roundtrip_segments(record: dict, sets: list[tuple[dict, tuple]], layout: PromptLayout, seed: int, i: int) -> list[Segments]:
  """The record's text as the target of the prompt each attribute set would get; exemplars are drawn
  with the same generator state for every set, so they differ only where the sets retrieve others."""
  return [dataclasses.replace(layout.for_generation(attributes, record["domain"], np.random.default_rng([seed, 17, i]),
                                                    values, uid=f"roundtrip-{i}-{j}"), target=record["text"])
          for j, (attributes, values) in enumerate(sets)]


def roundtrip_ranks(scores: Sequence[Sequence[float]]) -> np.ndarray:
  """Rank of each record's own set (score first in its row) among its row: 1 + the alternatives that
  score at least as high (a tie does not beat them)."""
  return np.array([1 + int(np.sum(np.asarray(row[1:]) >= row[0])) for row in scores], np.int64)


def roundtrip_scores(records: list[dict], model, tokenizer, batch_config, layout: PromptLayout, seeds,
                     alternatives: int, seed: int, batch_size: int) -> list[np.ndarray]:
  """Per record: log p(text | set) for its own set, then each alternative (`attribute_sets`)."""
  sets = attribute_sets(records, seeds, alternatives, seed)
  segments = [roundtrip_segments(r, s, layout, seed, i) for i, (r, s) in enumerate(zip(records, sets))]
  flat = text_log_probs(model, tokenizer, batch_config, [seg for row in segments for seg in row], batch_size)
  ends = np.cumsum([len(row) for row in segments])
  return [flat[end - len(row):end] for row, end in zip(segments, ends)]


def roundtrip_filter(records: list[dict], scores: list[np.ndarray], rank: int) -> tuple[list[dict], list[dict]]:
  """(records whose own set ranks within the first `rank`, the dropped ones, the best-ranked first)."""
  ranks = roundtrip_ranks(scores)
  kept = [r for r, k in zip(records, ranks) if k <= rank]
  rejected = sorted((i for i, k in enumerate(ranks) if k > rank), key=lambda i: ranks[i])
  return kept, [records[i] for i in rejected]
