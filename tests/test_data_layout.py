"""Prompt text and exemplar retrieval, on hand-made examples."""
import numpy as np
import pytest

from msp_jax.data.example import Example
from msp_jax.data.layout import ExemplarRetriever, PromptLayout, prompt_text
from msp_jax.data.ontology import Attribute, AttributeSet, Ontology


def ex(uid, intents, domain="hotels", text=None, slots=()):
  return Example(uid, domain, text or f"text of {uid}", {"intents": tuple(intents), "slots": tuple(slots)})


TRAIN = [
    ex("ab", ["a", "b"]),
    ex("a", ["a"]),
    ex("b", ["b"]),
    ex("c", ["c"]),
    ex("ab-banking", ["a", "b"], domain="banking"),
    ex("ab-copy", ["a", "b"], text="text of ab"),   # same text as "ab": TOPv2 has such duplicate rows
    ex("none-1", []),
    ex("none-2", []),
]
ONTOLOGY = Ontology("toy", (
    AttributeSet("intents", tuple(Attribute(n, f"intent {n}", n == "a") for n in "abc")),
    AttributeSet("slots", (Attribute("date", "date", True), Attribute("time", "time", True))),
), ("banking", "hotels"))


def retrieve(keys_of, k=2, pool_size=10, seed=0, domain="hotels", exclude=None):
  return [e.uid for e in ExemplarRetriever(TRAIN, k, pool_size)(keys_of.keys(), domain, np.random.default_rng(seed), exclude)]


def test_prompt_text_exact_layout():
  assert prompt_text(["hot", "today"], "weather", ["How warm is it", "Will it rain?"]) == (
      "hot, today in the weather domain:\n1) How warm is it\n2) Will it rain?\n3) ")
  assert prompt_text([], "conll2003", ["x"]) == " in the general domain:\n1) x\n2) "
  assert prompt_text(["v"], "music", []) == "v in the music domain:\n1) "


@pytest.mark.parametrize("seed", range(20))
def test_exemplars_share_attributes_and_never_the_example_itself(seed):
  # "a" and "b" share one intent each with "ab"; "c" and the banking example cannot be chosen.
  assert sorted(retrieve(TRAIN[0], seed=seed, exclude="text of ab")) == ["a", "b"]


def test_best_overlap_first():
  query = ex("q", ["a", "b"], text="new text")
  picks = {retrieve(query, k=1, pool_size=1, seed=s)[0] for s in range(20)}
  assert picks == {"ab", "ab-copy"}  # overlap 2 beats overlap 1; the two ties are both drawn


def test_ties_are_broken_by_the_seed():
  query = ex("q", ["a"], text="new text")
  picks = [retrieve(query, k=1, pool_size=1, seed=s)[0] for s in range(30)]
  assert set(picks) == {"ab", "a", "ab-copy"}
  assert retrieve(query, k=1, pool_size=1, seed=3) == retrieve(query, k=1, pool_size=1, seed=3)


def test_no_partner_falls_back_to_the_same_domain():
  lonely = ex("q", ["zzz"], text="new text")
  for seed in range(10):
    picks = retrieve(lonely, seed=seed)
    assert len(picks) == 2 and len(set(picks)) == 2 and "ab-banking" not in picks


def test_unknown_domain_falls_back_to_all_training_data():
  picks = retrieve(ex("q", ["a", "b"], domain="restaurants", text="new"), k=1, pool_size=1)
  assert picks[0] in {"ab", "ab-copy", "ab-banking"}


def test_examples_without_attributes_pair_with_each_other():
  assert retrieve(TRAIN[6], k=1, pool_size=1, exclude="text of none-1") == ["none-2"]


def test_segments_for_training_and_generation():
  layout = PromptLayout(ONTOLOGY, TRAIN, num_exemplars=2)
  example = Example("hotels/dev/3", "hotels", "book it", {"intents": ("a", "c"), "slots": ("time",)}, ("6 pm",))
  seg = layout.segments(example, np.random.default_rng(0))
  assert seg.attribute_ids == ((0, 2), (1,)) and seg.domain_id == 1 and seg.target == "book it"
  assert seg.text.startswith("6 pm in the hotels domain:\n1) text of ") and seg.text.endswith("\n3) ")
  gen = layout.for_generation({"intents": ["b"]}, "banking", np.random.default_rng(0))
  assert gen.target is None and gen.attribute_ids == ((1,), ()) and gen.domain_id == 0
  assert gen.text == " in the banking domain:\n1) text of ab-banking\n2) "  # banking has one training utterance


def test_unknown_attribute_names_the_valid_ones():
  with pytest.raises(ValueError, match="unknown attribute 'zzz'; valid: a, b, c"):
    ONTOLOGY.ids({"intents": ["zzz"]})
