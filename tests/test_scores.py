"""Task scores against hand-counted true/false positives."""
import pytest

from msp_jax import scores


def test_multilabel_prf_by_hand():
  gold = [{"a", "b"}, set(), {"c"}, set()]
  pred = [{"a"}, set(), {"c", "d"}, {"b"}]
  # a: tp; b: fn (ex 0) and fp (ex 3); c: tp; d: fp -> tp 2, fp 2, fn 1
  got = scores.multilabel_prf(gold, pred)
  assert (got["tp"], got["fp"], got["fn"]) == (2, 2, 1)
  assert got["micro_precision"] == pytest.approx(2 / 4)
  assert got["micro_recall"] == pytest.approx(2 / 3)
  assert got["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
  assert got["per_label_f1"] == {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
  assert got["macro_f1"] == pytest.approx(0.5)
  # a label never seen on either side carries no evidence and stays out of the macro mean
  assert scores.multilabel_prf(gold, pred, labels="abcde")["macro_f1"] == pytest.approx(0.5)
  restricted = scores.multilabel_prf(gold, pred, labels=["a", "c"])
  assert (restricted["tp"], restricted["fp"], restricted["fn"]) == (2, 0, 0)
  assert restricted["micro_f1"] == 1.0


def test_multilabel_empty_sets():
  # examples with empty gold and prediction add nothing
  base = scores.multilabel_prf([{"a"}, {"b"}], [{"a"}, set()])
  padded = scores.multilabel_prf([{"a"}, {"b"}, set(), set()], [{"a"}, set(), set(), set()])
  assert base == padded
  assert base["micro_precision"] == 1.0 and base["micro_recall"] == 0.5
  # nothing to label anywhere: perfect by convention
  nothing = scores.multilabel_prf([set(), set()], [set(), set()])
  assert nothing["micro_f1"] == nothing["macro_f1"] == 1.0
  # gold labels but no predictions: P = R = F1 = 0
  missed = scores.multilabel_prf([{"a"}], [set()])
  assert (missed["micro_precision"], missed["micro_recall"], missed["micro_f1"], missed["macro_f1"]) == (0, 0, 0, 0)
  with pytest.raises(ValueError):
    scores.multilabel_prf([{"a"}], [])


def test_general_intent_f1_ignores_domain_intents():
  gold = [{"affirm", "booking"}, {"deny"}]
  pred = [{"affirm"}, {"deny", "booking"}]
  assert scores.general_intent_f1(gold, pred, ["affirm", "deny"]) == 1.0
  assert scores.multilabel_prf(gold, pred)["micro_f1"] == pytest.approx(4 / 6)  # tp 2, fp 1, fn 1


def test_intent_set_accuracy():
  assert scores.intent_set_accuracy([{"a"}, {"a", "b"}, set()], [{"a"}, {"a"}, set()]) == pytest.approx(2 / 3)
  assert scores.intent_set_accuracy([["b", "a"]], [["a", "b"]]) == 1.0


GOLD = [[("per", 0, 2), ("loc", 5, 6)], [("org", 1, 3)]]
PRED = [[("per", 0, 2), ("loc", 4, 6)], [("org", 1, 3), ("per", 5, 6)]]


def test_span_f1_exact():
  # per(0,2), org(1,3) exact; loc(4,6) wrong boundary and per(5,6) spurious; gold loc(5,6) missed
  got = scores.span_f1(GOLD, PRED)
  assert (got["tp"], got["fp"], got["fn"]) == (2, 2, 1)
  assert got["precision"] == 0.5 and got["recall"] == pytest.approx(2 / 3)
  assert got["f1"] == pytest.approx(4 / 7)
  assert scores.span_f1([[]], [[]])["f1"] == 1.0


def test_partial_span_f1_is_lenient():
  # loc(4,6) now counts (overlaps loc(5,6)); per(5,6) has no per gold to overlap
  got = scores.partial_span_f1(GOLD, PRED)
  assert got["precision"] == pytest.approx(3 / 4) and got["recall"] == 1.0
  assert got["f1"] == pytest.approx(2 * 0.75 / 1.75)
  # types must agree, touching spans (end exclusive) do not overlap
  assert scores.partial_span_f1([[("per", 0, 2)]], [[("org", 0, 2)]])["f1"] == 0.0
  touching = scores.partial_span_f1([[("per", 0, 2)]], [[("per", 2, 4)]])
  assert (touching["precision"], touching["recall"]) == (0.0, 0.0)
  # each gold span matches one prediction only
  split = scores.partial_span_f1([[("per", 0, 4)]], [[("per", 0, 1), ("per", 2, 3)]])
  assert (split["precision"], split["recall"]) == (0.5, 1.0)


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
  assert scores.bio_to_spans(tags) == spans


@pytest.mark.parametrize("bad", ["X", "B-", "per", "S-per"])
def test_bio_to_spans_rejects(bad):
  with pytest.raises(ValueError):
    scores.bio_to_spans(["O", bad])


def test_attribute_prf_reports_recall():
  # the generator expressed fewer attributes than requested: precision alone (the original's
  # "accuracy") is perfect, recall shows the loss
  got = scores.attribute_prf([{"a", "b"}, {"c"}], [{"a"}, {"c"}])
  assert got["precision"] == 1.0
  assert got["recall"] == pytest.approx(2 / 3)
  assert got["f1"] == pytest.approx(0.8)
