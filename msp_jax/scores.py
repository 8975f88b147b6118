"""Task scores of the downstream models: multi-label intent/slot F1 (NLU++, TOPv2), entity F1
(CrossNER), exact intent-set accuracy and attribute correctness of generated data.

Each standard score sits beside the original MSP code's variant where the two differ, under its own
name, so results can be reported both ways. Conventions shared by all F1s here: a ratio with a zero
denominator is 0, F1 with P = R = 0 is 0, and a score over nothing at all (no gold and no predicted
item anywhere) is 1.0: there was nothing to get wrong.
"""
from __future__ import annotations

import collections
from typing import Collection, Hashable, Iterable, Sequence

Span = tuple[str, int, int]  # (type, start, end), end exclusive


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
  if tp + fp + fn == 0:
    return 1.0, 1.0, 1.0
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  return precision, recall, 2 * tp / (2 * tp + fp + fn)


def _check_lengths(gold: Sequence, pred: Sequence) -> None:
  if len(gold) != len(pred):
    raise ValueError(f"{len(gold)} gold but {len(pred)} predicted examples")


def multilabel_prf(gold: Sequence[Collection[Hashable]], pred: Sequence[Collection[Hashable]],
                   labels: Iterable[Hashable] | None = None) -> dict:
  """Micro precision/recall/F1 and macro F1 of per-example label sets.

  `labels` restricts the scoring to those labels (others are ignored on both sides); by default it
  is every label in gold or pred. An example with empty gold and empty prediction adds no TP/FP/FN.
  Macro F1 averages per-label F1 over the labels with any gold or predicted occurrence: a label never
  seen on either side carries no evidence (as sklearn's zero_division=nan) and is left out; with no
  such label macro F1 is 1.0, like micro.
  Returns micro_precision, micro_recall, micro_f1, macro_f1, tp, fp, fn and per_label_f1.
  """
  _check_lengths(gold, pred)
  scope = None if labels is None else set(labels)
  counts = collections.defaultdict(lambda: [0, 0, 0])  # label -> tp, fp, fn
  for g, p in zip(gold, pred):
    g, p = set(g), set(p)
    if scope is not None:
      g, p = g & scope, p & scope
    for label in g & p:
      counts[label][0] += 1
    for label in p - g:
      counts[label][1] += 1
    for label in g - p:
      counts[label][2] += 1
  tp, fp, fn = (sum(c[k] for c in counts.values()) for k in range(3))
  micro_p, micro_r, micro_f = _prf(tp, fp, fn)
  per_label = {label: _prf(*c)[2] for label, c in counts.items()}
  macro = sum(per_label.values()) / len(per_label) if per_label else 1.0
  return {"micro_precision": micro_p, "micro_recall": micro_r, "micro_f1": micro_f, "macro_f1": macro,
          "tp": tp, "fp": fp, "fn": fn, "per_label_f1": per_label}


def general_intent_f1(gold: Sequence[Collection[str]], pred: Sequence[Collection[str]],
                      general_labels: Iterable[str]) -> float:
  """Micro F1 over the domain-general intents only: the NLU++ cross-domain score.

  The original averaged per-example precision and recall (each with a 1e-4 smoothing term) and took
  the F1 of the two means; this is the standard micro F1 on the same restriction."""
  return multilabel_prf(gold, pred, labels=general_labels)["micro_f1"]


def intent_set_accuracy(gold: Sequence[Collection[str]], pred: Sequence[Collection[str]]) -> float:
  """Fraction of examples whose predicted intent set equals the gold set (TOPv2 exact match).

  The original's "intents_acc" was a per-example token overlap instead. Slot-type F1 for TOPv2 is
  `multilabel_prf` on slot-type sets. nan with no examples."""
  _check_lengths(gold, pred)
  if not gold:
    return float("nan")
  return sum(set(g) == set(p) for g, p in zip(gold, pred)) / len(gold)


def span_f1(gold_spans: Sequence[Collection[Span]], pred_spans: Sequence[Collection[Span]]) -> dict:
  """Entity-level exact-match micro precision/recall/F1 (CoNLL/CrossNER standard).

  One list of (type, start, end) spans per sentence; a prediction is correct when type and both
  boundaries equal a gold span's. Returns precision, recall, f1, tp, fp, fn."""
  _check_lengths(gold_spans, pred_spans)
  tp = fp = fn = 0
  for g, p in zip(gold_spans, pred_spans):
    g, p = collections.Counter(g), collections.Counter(p)
    hit = sum((g & p).values())
    tp, fp, fn = tp + hit, fp + sum(p.values()) - hit, fn + sum(g.values()) - hit
  precision, recall, f1 = _prf(tp, fp, fn)
  return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _overlaps(a: Span, b: Span) -> bool:
  return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def _greedy_matches(left: Sequence[Span], right: Sequence[Span]) -> int:
  """How many of `left` find an overlapping same-type partner in `right`, each partner used once."""
  free, matched = list(right), 0
  for a in left:
    for k, b in enumerate(free):
      if _overlaps(a, b):
        matched += 1
        del free[k]
        break
  return matched


def partial_span_f1(gold_spans: Sequence[Collection[Span]], pred_spans: Sequence[Collection[Span]]) -> dict:
  """The original MSP code's lenient entity score: a span is correct if it overlaps a span of the same
  type on the other side (each span matched at most once, greedily in order).

  Precision counts matched predictions, recall matched gold spans, so the two can differ by the
  number of many-to-one overlaps. The original worked on entity strings (all tokens of one contained
  in the other) and averaged per-sentence precision/recall; this is the same leniency on offsets,
  micro-averaged. Report it only next to `span_f1`. Returns precision, recall, f1."""
  _check_lengths(gold_spans, pred_spans)
  matched_pred = matched_gold = n_pred = n_gold = 0
  for g, p in zip(gold_spans, pred_spans):
    g, p = sorted(g, key=lambda s: (s[1], s[2], s[0])), sorted(p, key=lambda s: (s[1], s[2], s[0]))
    matched_pred += _greedy_matches(p, g)
    matched_gold += _greedy_matches(g, p)
    n_pred, n_gold = n_pred + len(p), n_gold + len(g)
  if n_pred + n_gold == 0:
    return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
  precision = matched_pred / n_pred if n_pred else 0.0
  recall = matched_gold / n_gold if n_gold else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1}


def bio_to_spans(tags: Sequence[str]) -> list[Span]:
  """(type, start, end) token spans of a BIO tag sequence, end exclusive.

  conlleval convention: an I- tag after O, at the start, or after a different type opens a new span
  (instead of being dropped). Tags are "O", "B-type" or "I-type"; anything else raises."""
  spans: list[Span] = []
  current: list | None = None  # [type, start]
  for i, tag in enumerate(list(tags) + ["O"]):
    if tag == "O":
      prefix, kind = "O", None
    elif len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
      prefix, kind = tag[0], tag[2:]
    else:
      raise ValueError(f"not a BIO tag: {tag!r} at {i}")
    continues = prefix == "I" and current is not None and current[0] == kind
    if current is not None and not continues:
      spans.append((current[0], current[1], i))
      current = None
    if prefix in "BI" and not continues:
      current = [kind, i]
  return spans


def attribute_prf(requested: Sequence[Collection[str]], predicted: Sequence[Collection[str]]) -> dict:
  """Attribute correctness of generated data: a classifier trained on real data predicts the
  attributes of each generated text, compared with the attributes the generator was asked for.

  Micro precision, recall and F1 (requested = gold). The original reported only the micro precision,
  as "accuracy" (for CrossNER even (precision + 1) / 2), which a generator can raise by expressing
  fewer of the requested attributes; recall exposes that."""
  scores = multilabel_prf(requested, predicted)
  return {"precision": scores["micro_precision"], "recall": scores["micro_recall"], "f1": scores["micro_f1"]}
