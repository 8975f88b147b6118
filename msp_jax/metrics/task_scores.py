"""Task scores of the downstream models: multi-label intent/slot F1 (NLU++, TOPv2), entity F1
(CrossNER), exact intent-set accuracy and attribute correctness of generated data.

Each standard score sits beside the original MSP code's variant where the two differ, under a name
ending in `_original`, so results can be reported both ways. Conventions shared by the standard F1s:
a ratio with a zero denominator is 0, F1 with P = R = 0 is 0, and a score over nothing at all (no
gold and no predicted item anywhere) is 1.0: there was nothing to get wrong. The `_original` scores
follow the original's own conventions instead (their docstrings say which).
"""
from __future__ import annotations

import collections
import re
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


def _unmatched(gold: Sequence, unmatched: Sequence[int] | None) -> Sequence[int]:
  """Per example, the predictions that name no label at all (0 each by default), one count per example."""
  unmatched = [0] * len(gold) if unmatched is None else unmatched
  _check_lengths(gold, unmatched)
  return unmatched


def multilabel_prf(gold: Sequence[Collection[Hashable]], pred: Sequence[Collection[Hashable]],
                   labels: Iterable[Hashable] | None = None, unmatched: Sequence[int] | None = None) -> dict:
  """Micro precision/recall/F1 and macro F1 of per-example label sets.

  `labels` restricts the scoring to those labels (others are ignored on both sides); by default it
  is every label in gold or pred. An example with empty gold and empty prediction adds no TP/FP/FN.
  Macro F1 averages per-label F1 over the labels with any gold or predicted occurrence: a label never
  seen on either side carries no evidence (as sklearn's zero_division=nan) and is left out; with no
  such label macro F1 is 1.0, like micro.
  `unmatched[i]`: predictions of example i that name no label at all (a written label string's
  unknown pieces): false positives of the micro scores; macro F1 is per label and leaves them out.
  Returns micro_precision, micro_recall, micro_f1, macro_f1, tp, fp, fn and per_label_f1.
  """
  _check_lengths(gold, pred)
  unmatched = _unmatched(gold, unmatched)
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
  fp += sum(unmatched)
  micro_p, micro_r, micro_f = _prf(tp, fp, fn)
  per_label = {label: _prf(*c)[2] for label, c in counts.items()}
  macro = sum(per_label.values()) / len(per_label) if per_label else 1.0
  return {"micro_precision": micro_p, "micro_recall": micro_r, "micro_f1": micro_f, "macro_f1": macro,
          "tp": tp, "fp": fp, "fn": fn, "per_label_f1": per_label}


def general_intent_f1(gold: Sequence[Collection[str]], pred: Sequence[Collection[str]],
                      general_labels: Iterable[str]) -> float:
  """Micro F1 over the domain-general intents only: the NLU++ cross-domain score.

  The standard micro F1 on the restriction the original used; its own formula (per-utterance
  averages) is `intent_f1_original(..., general_labels=...)`."""
  return multilabel_prf(gold, pred, labels=general_labels)["micro_f1"]


def intent_set_accuracy(gold: Sequence[Collection[str]], pred: Sequence[Collection[str]]) -> float:
  """Fraction of examples whose predicted intent set equals the gold set (TOPv2 exact match).

  The original's "intents_acc" was a per-example token overlap instead. Slot-type F1 for TOPv2 is
  `multilabel_prf` on slot-type sets. nan with no examples."""
  _check_lengths(gold, pred)
  if not gold:
    return float("nan")
  return sum(set(g) == set(p) for g, p in zip(gold, pred)) / len(gold)


def span_f1(gold_spans: Sequence[Collection[Span]], pred_spans: Sequence[Collection[Span]],
            unmatched: Sequence[int] | None = None) -> dict:
  """Entity-level exact-match micro precision/recall/F1 (CoNLL/CrossNER standard).

  One list of (type, start, end) spans per sentence; a prediction is correct when type and both
  boundaries equal a gold span's. `unmatched[i]`: predicted entities of sentence i that are no span at
  all (a written label string's malformed pieces): false positives. Returns precision, recall, f1, tp, fp, fn."""
  _check_lengths(gold_spans, pred_spans)
  tp, fp, fn = 0, sum(_unmatched(gold_spans, unmatched)), 0
  for g, p in zip(gold_spans, pred_spans):
    g, p = collections.Counter(g), collections.Counter(p)
    hit = sum((g & p).values())
    tp, fp, fn = tp + hit, fp + sum(p.values()) - hit, fn + sum(g.values()) - hit
  precision, recall, f1 = _prf(tp, fp, fn)
  return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


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


# --- the original MSP code's scores ---------------------------------------------------------------
# Its utils/evaluate.py at commit 6186579 (ORIGINAL.md §8.2), reproduced on the label strings its
# text-to-label model would have produced for our predictions, so numbers compare with its tables.
# Report them only beside the standard scores: they are macro averages over sentences of smoothed,
# rounded per-sentence values, and the F1 is that of the two averages.

_PUNCTUATION = re.compile(r"[!\"#$%&()\*\+\-./:;=?@\\^`{|}~_']")  # all but , [ ] (and < >)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_UNMATCHED = "\0unmatched"  # a written piece that names no label: equal to no normalised gold piece

# The original's CrossNER parser renamed these raw types (ORIGINAL.md §4.3); the names matter because
# its normalisation keeps only the first 7 tokens of "entity [type]".
ORIGINAL_ENTITY_TYPES = {
    "organisation": "organization", "misc": "miscellaneous", "politicalparty": "party", "literarygenre": "genre",
    "musicgenre": "genre", "musicalinstrument": "instrument", "musicalartist": "artist",
    "chemicalcompound": "compound", "chemicalelement": "element", "astronomicalobject": "astronomy",
    "academicjournal": "journal", "programlang": "language",
}


def normalize_original(text: str, max_tokens: int = 7) -> str:
  """The original's `normalize_text`: lowercase; every punctuation mark except `, [ ]` (underscore
  included) becomes a space; the articles a/an/the go; the first `max_tokens` tokens stay."""
  if text in ("none", "<none>", "remove", "<remove>"):
    return "<none>"
  text = _ARTICLES.sub(" ", _PUNCTUATION.sub(" ", text.lower().strip()))
  return " ".join(text.split()[:max_tokens])


def _f1_of_means(precisions: Sequence[float], recalls: Sequence[float]) -> dict:
  if not precisions:
    return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
  p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
  return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def _token_pr_original(pred: Sequence[str], gold: Sequence[str]) -> tuple[float, float]:
  """`calculate_token_f1`: membership counts over 1e-4-smoothed denominators, rounded to 3 decimals."""
  precision = sum(p in gold for p in pred) / (len(pred) + 1e-4)
  recall = sum(g in pred for g in gold) / (len(gold) + 1e-4)
  return round(precision, 3), round(recall, 3)


def intent_f1_original(gold: Sequence[Collection[str]], pred: Sequence[Collection[str]],
                       general_labels: Iterable[str] | None = None, unmatched: Sequence[int] | None = None) -> dict:
  """The original's NLU++ score. Per utterance P = #(predicted in gold) / #predicted and
  R = #(gold in predicted) / #gold, each denominator + 1e-4 and rounded to 3 decimals; P and R are
  averaged over utterances and F1 = 2PR / (P + R) of the two averages.

  Names are compared after `normalize_original`, as the original compared label strings.
  Without `general_labels` every intent counts (its `calculate_token_f1`, the in-domain settings):
  an utterance with no intent is the label string "", one piece, so empty gold with an empty
  prediction scores P = R = 1 and with any prediction P = R = 0; `unmatched[i]` written pieces that
  name no intent count as predictions that match nothing. With `general_labels` only those intents
  count on both sides (its cross-domain `calculate_nlu_f1`), and only the utterances with at least one
  general gold intent are scored: the original's cross-domain dev and test splits hold no others
  (ORIGINAL.md 4.2). Returns precision, recall and f1 (nan with no utterances)."""
  _check_lengths(gold, pred)
  unmatched = _unmatched(gold, unmatched)
  general = None if general_labels is None else {normalize_original(x) for x in general_labels}
  precisions, recalls = [], []
  for g, p, u in zip(gold, pred, unmatched):
    p = [normalize_original(x) for x in sorted(p)] + [_UNMATCHED] * u  # ";".join(...).split(";")
    g, p = [normalize_original(x) for x in sorted(g)] or [""], p or [""]
    if general is not None:
      g, p = [x for x in g if x in general], [x for x in p if x in general]
      if not g:  # not in the original's cross-domain splits
        continue
    precision, recall = _token_pr_original(p, g)
    precisions.append(precision)
    recalls.append(recall)
  return _f1_of_means(precisions, recalls)


def _entity_pieces(entities: Sequence[tuple[str, str]]) -> list[str]:
  """The normalized pieces of the label string "entity [type] <sep> ..." ("" when there is none)."""
  return [normalize_original(f"{text} [{ORIGINAL_ENTITY_TYPES.get(kind, kind)}]") for kind, text in entities] or [""]


def _entities_by_type(pieces: Sequence[str]) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for piece in pieces:
    parts = piece.split("[")
    if len(parts) == 2:  # a piece without exactly one "[" still counts in the denominator
      out.setdefault(normalize_original(parts[1].strip("[ ]")), []).append(normalize_original(parts[0].strip()))
  return out


def _greedy_containment(outer: dict[str, list[str]], inner: dict[str, list[str]]) -> int:
  """How many entities of `outer` contain all tokens of a same-type entity of `inner`, each inner one
  used once, first come first served (the original's loops)."""
  free = {kind: list(entities) for kind, entities in inner.items()}
  matched = 0
  for kind, entities in outer.items():
    for entity in entities:
      tokens = entity.split(" ")
      for candidate in free.get(kind, []):
        if all(t in tokens for t in candidate.split(" ")):
          matched += 1
          free[kind].remove(candidate)
          break
  return matched


def span_partial_f1_original(gold: Sequence[Sequence[tuple[str, str]]],
                             pred: Sequence[Sequence[tuple[str, str]]], unmatched: Sequence[int] | None = None) -> dict:
  """The original's CrossNER score (`calculate_ner_f1`) on per-sentence (type, entity text) lists.

  A predicted entity counts toward precision when it contains every token of a same-type gold
  entity (pred ⊇ gold); a gold entity counts toward recall when it contains every token of a
  same-type predicted one (pred ⊆ gold); matching is greedy and one-to-one, separately for the two.
  Per sentence P = matches / (#pred + 1e-4), R = found / (#gold + 1e-4), rounded to 3 decimals,
  then averaged over sentences; F1 = 2PR / (P + R) of the averages. Entities are compared as
  normalized strings, types as the original named them (`ORIGINAL_ENTITY_TYPES`). A sentence
  without entities is the label string "", one piece that never matches, so it scores P = R = 0
  whatever is predicted; an empty prediction likewise has P = 0. `unmatched[i]` written pieces of
  sentence i that are not "entity [known type]" count as predicted pieces that match nothing, as the
  original counted them. Returns precision, recall, f1."""
  _check_lengths(gold, pred)
  unmatched = _unmatched(gold, unmatched)
  precisions, recalls = [], []
  for g, p, u in zip(gold, pred, unmatched):
    g_pieces, p_pieces = _entity_pieces(g), _entity_pieces(p)
    g_types, p_types = _entities_by_type(g_pieces), _entities_by_type(p_pieces)
    predicted = len(p) + u or 1  # "" is one piece
    precisions.append(round(_greedy_containment(p_types, g_types) / (predicted + 1e-4), 3))
    recalls.append(round(_greedy_containment(g_types, p_types) / (len(g_pieces) + 1e-4), 3))
  return _f1_of_means(precisions, recalls)


def span_texts(text: str, spans: Sequence[Span]) -> list[tuple[str, str]]:
  """(type, entity text) of word spans (type, start, end) over the whitespace words of `text`."""
  words = text.split()
  return [(kind, " ".join(words[start:end])) for kind, start, end in spans]
