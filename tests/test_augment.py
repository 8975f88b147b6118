"""EDA: determinism, protected values, the word-level invariants of each operation."""
import collections

import numpy as np
import pytest

from msp_jax import augment
from msp_jax.data.example import Example

# test data: a tiny synonym table, with entries for protected words so that protection is what
# keeps them unchanged
TABLE = {"please": ["kindly"], "play": ["start", "put on"], "some": ["several"], "music": ["tunes"],
         "now": ["immediately"], "bohemian": ["gypsy"], "rhapsody": ["ode"], "queen": ["monarch"],
         "by": ["from"], "on": ["upon"], "spotify": ["radio"], "sang": ["sung"]}


def table_synonyms(word):
  return TABLE.get(word.lower(), [])


def spans_of(text, *values):
  return [(text.index(v), text.index(v) + len(v)) for v in values]


def test_deterministic():
  text = "please play some music by Queen on spotify now"
  run = lambda seed: augment.eda(text, np.random.default_rng(seed), alpha=0.3, num_aug=8,
                                 protected_spans=spans_of(text, "Queen"), synonyms=table_synonyms)
  assert run(3) == run(3)
  assert run(3) != run(4)
  assert len(run(3)) == 8


def test_protected_values_survive_with_true_spans():
  text = "please play Bohemian Rhapsody by Queen on spotify now"
  protected = spans_of(text, "Bohemian Rhapsody", "Queen")
  out = augment.eda(text, np.random.default_rng(0), alpha=0.5, num_aug=40, protected_spans=protected,
                    synonyms=table_synonyms)
  for a in out:
    assert [a.text[s:e] for s, e in a.spans] == ["Bohemian Rhapsody", "Queen"]
  assert len({a.text for a in out}) > 10  # the rest of the text did change


def test_protected_span_inside_a_word_with_punctuation():
  text = "book Nobu, tonight please"
  out = augment.eda(text, np.random.default_rng(1), alpha=0.9, num_aug=12, protected_spans=spans_of(text, "Nobu"),
                    synonyms=table_synonyms)
  for a in out:
    (s, e), = a.spans
    assert a.text[s:e] == "Nobu"
    assert "Nobu," in a.text.split()


def test_span_starting_in_whitespace_is_rejected():
  with pytest.raises(ValueError):
    augment.eda("play  Queen", np.random.default_rng(0), protected_spans=[(4, 11)])


def test_deletion_never_empties_a_text():
  # without synonyms the operations alternate swap, deletion; alpha 1 deletes every unprotected word
  out = augment.eda("hi there friend", np.random.default_rng(2), alpha=1.0, num_aug=20)
  for a in out[1::2]:
    assert len(a.text.split()) == 1 and a.text in {"hi", "there", "friend"}
  text = "drop all of this but Queen"
  for a in augment.eda(text, np.random.default_rng(2), alpha=1.0, num_aug=6,
                       protected_spans=spans_of(text, "Queen"))[1::2]:
    assert a.text == "Queen" and a.spans == ((0, 5),)


def test_swap_keeps_the_multiset_of_words():
  text = "one two three four five six"
  out = augment.eda(text, np.random.default_rng(5), alpha=0.4, num_aug=10)
  for a in out[0::2]:
    assert a.text != text
    assert collections.Counter(a.text.split()) == collections.Counter(text.split())


def test_replacement_and_insertion_use_synonyms():
  text = "Please play some music now"
  out = augment.eda(text, np.random.default_rng(9), alpha=0.4, num_aug=4, synonyms=table_synonyms)
  words, replaced, inserted = text.split(), out[0].text.split(), out[1].text.split()
  # int(0.4 * 5) = 2 words replaced in place, by a synonym (capital kept) of the word they replace
  changed = [(w, r) for w, r in zip(words, replaced) if w != r]
  assert len(replaced) == len(words) and len(changed) == 2
  for w, r in changed:
    assert r.lower() in TABLE[w.lower()] and r[0].isupper() == w[0].isupper()
  # two single-word synonyms inserted, the original words kept in order
  assert len(inserted) == len(words) + 2
  rest = iter(inserted)
  assert all(any(w == x for x in rest) for w in words)
  assert augment.eda("Please", np.random.default_rng(0), alpha=1.0, num_aug=1, synonyms=table_synonyms) == [
      augment.Augmented("Kindly", ())]
  # punctuation stays around the replaced word
  assert augment.eda("(now!)", np.random.default_rng(0), alpha=1.0, num_aug=1, synonyms=table_synonyms) == [
      augment.Augmented("(immediately!)", ())]


class FakeVocab:
  """A byte-level-BPE-like vocabulary with one SentencePiece-style entry."""
  tokens = ["Ġhotel", "Ġinn", "Ġmotel", "Ġcar", "Ġauto", "ing", "Ġ123", "<pad>", "▁lodge"]

  def __len__(self):
    return len(self.tokens)

  def convert_ids_to_tokens(self, i):
    return self.tokens[i]

  def decode(self, ids):
    token = self.tokens[ids[0]]
    return token[1:] if token.startswith("▁") else token.replace("Ġ", " ")


def test_embedding_synonyms_are_cosine_neighbours_among_whole_words():
  embeddings = np.array([
      [5.0, 0.0, 0.0],   # hotel (large norm: cosine, not dot product)
      [0.9, 0.1, 0.0],   # inn     cos 0.994
      [0.95, 0.05, 0.0],  # motel  cos 0.999
      [10.0, 10.0, 0.0],  # car    cos 0.707 but the largest dot product
      [0.0, 0.9, 0.1],   # auto
      [1.0, 0.0, 0.0],   # "ing": not a word start
      [1.0, 0.0, 0.0],   # " 123": not alphabetic
      [1.0, 0.0, 0.0],   # <pad>
      [0.8, 0.2, 0.0],   # lodge   cos 0.970
      [1.0, 0.0, 0.0],   # padding row beyond the vocabulary
  ])
  synonyms = augment.embedding_synonyms(embeddings, FakeVocab(), k=3)
  assert synonyms("hotel") == ["motel", "inn", "lodge"]
  assert synonyms("Hotel") == ["motel", "inn", "lodge"]
  assert synonyms("zzz") == []
  assert augment.embedding_synonyms(embeddings, FakeVocab(), k=1)("auto") == ["car"]


def test_augment_examples_keep_labels_and_order_of_appearance():
  ex = Example(uid="music/train/1", domain="music", text="Queen sang Bohemian Rhapsody",
               attributes={"entities": ("band", "song")}, values=("Queen", "Bohemian Rhapsody"),
               typed_values=(("band", "Queen"), ("song", "Bohemian Rhapsody")))
  out = augment.augment_examples([ex], 12, np.random.default_rng(0), table_synonyms, alpha=0.3)
  assert [o.uid for o in out] == [f"music/train/1/eda{j}" for j in range(12)]
  reordered = 0
  for o in out:
    assert o.attributes == ex.attributes and o.domain == ex.domain
    assert "Queen" in o.text and "Bohemian Rhapsody" in o.text
    first = o.text.index("Queen") < o.text.index("Bohemian Rhapsody")
    assert o.typed_values == (ex.typed_values if first else ex.typed_values[::-1])
    assert o.values == (ex.values if first else ex.values[::-1])
    reordered += not first
  assert reordered > 0
  plain = Example(uid="hotel/0", domain="hotel", text="is there wifi in the room please",
                  attributes={"intents": ("wifi",), "slots": ()}, values=("room",))
  got = augment.augment_examples([plain], 2, np.random.default_rng(0), None)
  assert [g.values for g in got] == [("room",), ("room",)] and got[0].text != plain.text  # a swap


def test_augment_examples_move_every_gold_span_with_its_words():
  text = "Queen met queen Elizabeth and Queen played"
  gold = ({"type": "band", "start": 0, "end": 5}, {"type": "person", "start": 10, "end": 25},
          {"type": "band", "start": 30, "end": 35})
  ex = Example(uid="m/0", domain="music", text=text, attributes={"entities": ("band", "person")},
               values=("Queen", "queen Elizabeth"), typed_values=(("band", "Queen"), ("person", "queen Elizabeth")),
               spans=gold)
  out = augment.augment_examples([ex], 12, np.random.default_rng(0), table_synonyms, alpha=0.3)
  moved = 0
  for o in out:
    found = [(s["type"], o.text[s["start"]:s["end"]]) for s in o.spans]
    assert sorted(found) == sorted([("band", "Queen"), ("person", "queen Elizabeth"), ("band", "Queen")])
    assert [s["start"] for s in o.spans] == sorted(s["start"] for s in o.spans)  # in order of appearance
    assert o.typed_values[0] == found[0]
    moved += o.text != text
  assert moved > 0
