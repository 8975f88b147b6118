"""Task scores against hand-counted true/false positives, the original code's formulas worked by hand,
and exact span F1 against seqeval."""
import numpy as np
import pytest

from msp_jax.metrics import task_scores


def test_multilabel_prf_by_hand():
  gold = [{"a", "b"}, set(), {"c"}, set()]
  pred = [{"a"}, set(), {"c", "d"}, {"b"}]
  # a: tp; b: fn (ex 0) and fp (ex 3); c: tp; d: fp -> tp 2, fp 2, fn 1
  got = task_scores.multilabel_prf(gold, pred)
  assert (got["tp"], got["fp"], got["fn"]) == (2, 2, 1)
  assert got["micro_precision"] == pytest.approx(2 / 4)
  assert got["micro_recall"] == pytest.approx(2 / 3)
  assert got["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
  assert got["per_label_f1"] == {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
  assert got["macro_f1"] == pytest.approx(0.5)
  # a label never seen on either side carries no evidence and stays out of the macro mean
  assert task_scores.multilabel_prf(gold, pred, labels="abcde")["macro_f1"] == pytest.approx(0.5)
  restricted = task_scores.multilabel_prf(gold, pred, labels=["a", "c"])
  assert (restricted["tp"], restricted["fp"], restricted["fn"]) == (2, 0, 0)
  assert restricted["micro_f1"] == 1.0


def test_unmatched_predictions_are_micro_false_positives_only():
  gold, pred = [{"a", "b"}, set()], [{"a"}, set()]
  # 3 written labels that name no label (2 in example 0, 1 in example 1): fp 0 -> 3; macro is per label
  got = task_scores.multilabel_prf(gold, pred, unmatched=[2, 1])
  assert (got["tp"], got["fp"], got["fn"]) == (1, 3, 1)
  assert got["micro_precision"] == pytest.approx(1 / 4) and got["micro_f1"] == pytest.approx(2 / (2 + 3 + 1))
  assert got["macro_f1"] == task_scores.multilabel_prf(gold, pred)["macro_f1"]
  spans = task_scores.span_f1(GOLD, PRED, unmatched=[0, 2])  # test_span_f1_exact's counts, 2 fp more
  assert (spans["tp"], spans["fp"], spans["fn"]) == (2, 4, 1)


def test_multilabel_empty_sets():
  # examples with empty gold and prediction add nothing
  base = task_scores.multilabel_prf([{"a"}, {"b"}], [{"a"}, set()])
  padded = task_scores.multilabel_prf([{"a"}, {"b"}, set(), set()], [{"a"}, set(), set(), set()])
  assert base == padded
  assert base["micro_precision"] == 1.0 and base["micro_recall"] == 0.5
  # nothing to label anywhere: perfect by convention
  nothing = task_scores.multilabel_prf([set(), set()], [set(), set()])
  assert nothing["micro_f1"] == nothing["macro_f1"] == 1.0
  # gold labels but no predictions: P = R = F1 = 0
  missed = task_scores.multilabel_prf([{"a"}], [set()])
  assert (missed["micro_precision"], missed["micro_recall"], missed["micro_f1"], missed["macro_f1"]) == (0, 0, 0, 0)
  with pytest.raises(ValueError):
    task_scores.multilabel_prf([{"a"}], [])


def test_general_intent_f1_ignores_domain_intents():
  gold = [{"affirm", "booking"}, {"deny"}]
  pred = [{"affirm"}, {"deny", "booking"}]
  assert task_scores.general_intent_f1(gold, pred, ["affirm", "deny"]) == 1.0
  assert task_scores.multilabel_prf(gold, pred)["micro_f1"] == pytest.approx(4 / 6)  # tp 2, fp 1, fn 1


def test_intent_set_accuracy():
  assert task_scores.intent_set_accuracy([{"a"}, {"a", "b"}, set()], [{"a"}, {"a"}, set()]) == pytest.approx(2 / 3)
  assert task_scores.intent_set_accuracy([["b", "a"]], [["a", "b"]]) == 1.0


GOLD = [[("per", 0, 2), ("loc", 5, 6)], [("org", 1, 3)]]
PRED = [[("per", 0, 2), ("loc", 4, 6)], [("org", 1, 3), ("per", 5, 6)]]


def test_span_f1_exact():
  # per(0,2), org(1,3) exact; loc(4,6) wrong boundary and per(5,6) spurious; gold loc(5,6) missed
  got = task_scores.span_f1(GOLD, PRED)
  assert (got["tp"], got["fp"], got["fn"]) == (2, 2, 1)
  assert got["precision"] == 0.5 and got["recall"] == pytest.approx(2 / 3)
  assert got["f1"] == pytest.approx(4 / 7)
  assert task_scores.span_f1([[]], [[]])["f1"] == 1.0


def test_span_f1_equals_seqeval():
  # random BIO sequences, including I- tags that open an entity (after O, at the start, after another type)
  from seqeval import metrics
  rng = np.random.default_rng(0)
  tags = ["O", "B-per", "I-per", "B-loc", "I-loc", "B-musical-artist", "I-musical-artist"]
  for trial in range(20):
    gold = [[str(t) for t in rng.choice(tags, rng.integers(1, 12))] for _ in range(30)]
    pred = [[g if rng.random() < 0.7 else str(rng.choice(tags)) for g in row] for row in gold]
    got = task_scores.span_f1([task_scores.bio_to_spans(r) for r in gold], [task_scores.bio_to_spans(r) for r in pred])
    assert got["precision"] == pytest.approx(metrics.precision_score(gold, pred)), trial
    assert got["recall"] == pytest.approx(metrics.recall_score(gold, pred)), trial
    assert got["f1"] == pytest.approx(metrics.f1_score(gold, pred)), trial


def test_normalize_original():
  # lowercase; punctuation but , [ ] -> space (underscore and apostrophe too); articles out, even "a"
  # inside brackets; the first 7 tokens
  assert task_scores.normalize_original("The Hotel's_WiFi-password, [a] now!") == "hotel s wifi password, [ ] now"
  assert task_scores.normalize_original("one two three four five six seven eight") == "one two three four five six seven"
  assert task_scores.normalize_original("none") == "<none>"


def test_span_partial_f1_original_by_hand():
  gold = [[("person", "John Smith"), ("location", "New York")], [], [("misc", "The Beatles")], [("person", "Ann")]]
  pred = [[("person", "John Smith Jr"), ("location", "York"), ("person", "Mary")], [("person", "Anna")],
          [("misc", "beatles!")], []]
  # 1: precision: "john smith jr" contains gold "john smith"; "york" lacks "new"; "mary" has no gold left
  #    -> 1 / (3 + 1e-4) = 0.33332 -> 0.333. recall: "john smith" contains no prediction ("jr" is not in
  #    it), "new york" contains "york" -> 1 / (2 + 1e-4) -> 0.5
  # 2: no gold entity: the gold string "" is one piece that never matches -> P = R = 0
  # 3: "the" and "!" are normalized away on both sides -> 1 / 1.0001 -> 1.0 each
  # 4: nothing predicted: the predicted "" is one piece -> P = 0; R = 0
  precision, recall = (0.333 + 0 + 1 + 0) / 4, (0.5 + 0 + 1 + 0) / 4
  got = task_scores.span_partial_f1_original(gold, pred)
  assert got["precision"] == pytest.approx(precision) and got["recall"] == pytest.approx(recall)
  assert got["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_span_partial_f1_original_counts_malformed_pieces():
  # "Ann [person] <sep> no brackets": two pieces, one matches -> P 1 / 2.0001 -> 0.5, R 1.0; a sentence
  # whose only piece is malformed: P = 0 / 1 as an empty prediction, R 0
  got = task_scores.span_partial_f1_original([[("person", "Ann")], [("person", "Bo")]],
                                             [[("person", "Ann")], []], unmatched=[1, 1])
  assert (got["precision"], got["recall"]) == ((0.5 + 0) / 2, (1.0 + 0) / 2)


def test_span_partial_f1_original_entity_free_sentences_score_zero():
  # the right answer (nothing) for a sentence without entities still scores 0
  assert task_scores.span_partial_f1_original([[]], [[]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
  half = task_scores.span_partial_f1_original([[], [("person", "Ann")]], [[], [("person", "Ann")]])
  assert (half["precision"], half["recall"], half["f1"]) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("gold,pred,precision,recall", [
    # one-to-one greedy: the prediction is spent on the first gold it contains ("john"), so "john
    # smith" finds it only for recall (its own pool): P 1/1.0001 -> 1.0, R 1/2.0001 -> 0.5
    ([("person", "John"), ("person", "John Smith")], [("person", "John Smith")], 1.0, 0.5),
    # one gold, two predictions containing it: only the first counts for precision
    ([("person", "John Smith")], [("person", "John Smith"), ("person", "John Smith Jr")], 0.5, 1.0),
    # types must agree
    ([("person", "Prince")], [("band", "Prince")], 0.0, 0.0),
    # the original's type names: music and literary genres are both "genre"
    ([("musicgenre", "rock")], [("literarygenre", "Rock")], 1.0, 1.0),
    # "entity [type]" keeps its first 7 tokens: a 7-word entity loses its type and never matches
    ([("album", "one two three four five six seven")], [("album", "one two three four five six seven")], 0.0, 0.0),
    ([("album", "one two three four five six")], [("album", "one two three four five six")], 1.0, 1.0),
])
def test_span_partial_f1_original_matching(gold, pred, precision, recall):
  got = task_scores.span_partial_f1_original([gold], [pred])
  assert (got["precision"], got["recall"]) == (precision, recall)


def test_span_texts():
  assert task_scores.span_texts("Ada met Babbage in London .", [("per", 0, 1), ("per", 2, 3), ("loc", 4, 5)]) == \
      [("per", "Ada"), ("per", "Babbage"), ("loc", "London")]


def test_intent_f1_original_by_hand():
  gold = [{"affirm", "booking"}, set(), {"deny"}, set()]
  pred = [{"affirm"}, set(), {"deny", "wifi", "parking"}, {"booking"}]
  # all intents (the original's in-domain formula), per utterance P, R with +1e-4, rounded to 3:
  # 1: P 1/1.0001 -> 1.0, R 1/2.0001 -> 0.5   2: "" vs "": P = R = 1.0 (the empty string matches itself)
  # 3: P 1/3.0001 -> 0.333, R 1.0             4: "" vs booking: P = R = 0
  precision, recall = (1 + 1 + 0.333 + 0) / 4, (0.5 + 1 + 1 + 0) / 4
  got = task_scores.intent_f1_original(gold, pred)
  assert got["precision"] == pytest.approx(precision) and got["recall"] == pytest.approx(recall)
  assert got["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
  # general intents only (its cross-domain formula, on its cross-domain splits, which hold only the
  # utterances with a general gold intent): 2 and 4 are not scored; 1 and 3 are perfect
  general = task_scores.intent_f1_original(gold, pred, ["affirm", "deny"])
  assert (general["precision"], general["recall"], general["f1"]) == (1.0, 1.0, 1.0)
  # written pieces that name no intent count as predictions: utterance 2's "" vs one unknown piece
  # scores P = R = 0 (it was 1 / 1); utterance 1's P 1 / 2.0001 -> 0.5
  unmatched = task_scores.intent_f1_original(gold, pred, unmatched=[1, 1, 0, 0])
  precision, recall = (0.5 + 0 + 0.333 + 0) / 4, (0.5 + 0 + 1 + 0) / 4
  assert unmatched["precision"] == pytest.approx(precision) and unmatched["recall"] == pytest.approx(recall)
  # ... and the general-intent score ignores them, as it ignores every non-general piece
  assert task_scores.intent_f1_original(gold, pred, ["affirm", "deny"], unmatched=[1, 1, 0, 0]) == general
  # the standard micro F1 on the same restriction: tp 2, nothing else
  assert task_scores.general_intent_f1(gold, pred, ["affirm", "deny"]) == 1.0


@pytest.mark.parametrize("tags,spans", [
    (["B-per", "I-per", "O", "B-loc"], [("per", 0, 2), ("loc", 3, 4)]),
    (["I-per", "I-per"], [("per", 0, 2)]),  # I- at the start opens a span
    (["O", "I-loc", "O"], [("loc", 1, 2)]),  # I- after O opens a span
    (["B-per", "I-loc"], [("per", 0, 1), ("loc", 1, 2)]),  # I- of another type opens a new one
    (["B-per", "B-per"], [("per", 0, 1), ("per", 1, 2)]),
    (["B-musical-artist", "I-musical-artist"], [("musical-artist", 0, 2)]),
    ([], []),
    (["O", "O"], []),
])
def test_bio_to_spans(tags, spans):
  assert task_scores.bio_to_spans(tags) == spans


@pytest.mark.parametrize("bad", ["X", "B-", "per", "S-per"])
def test_bio_to_spans_rejects(bad):
  with pytest.raises(ValueError):
    task_scores.bio_to_spans(["O", bad])


def test_attribute_prf_reports_recall():
  # the generator expressed fewer attributes than requested: precision alone (the original's
  # "accuracy") is perfect, recall shows the loss
  got = task_scores.attribute_prf([{"a", "b"}, {"c"}], [{"a"}, {"c"}])
  assert got["precision"] == 1.0
  assert got["recall"] == pytest.approx(2 / 3)
  assert got["f1"] == pytest.approx(0.8)
