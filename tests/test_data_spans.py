"""Gold spans travel from the raw annotation to every Example; BIO tags are rebuilt from them exactly.

The references are the raw files, parsed here with a few lines of their own (not the builders' parsers).
"""
import csv
import re

import pytest

from msp_jax.data import spans as spans_lib
from msp_jax.data.example import Example


def raw_bio(path):
  """[(tokens, tags, entities)] of a CoNLL `token<TAB>tag` file; entities (type, first, end) in token
  offsets. Every entity in these files starts with B- (no stray I-), so B- alone opens one."""
  sentences, tokens, tags = [], [], []
  for line in list(open(path, encoding="utf-8")) + ["\n"]:
    if line.strip():
      token, tag = line.rstrip("\n").split("\t")
      tokens.append(token)
      tags.append(tag)
    elif tokens:
      entities = []
      for i, tag in enumerate(tags):
        if tag.startswith("B-"):
          end = i + 1
          while end < len(tags) and tags[end] == "I-" + tag[2:]:
            end += 1
          entities.append((tag[2:], i, end))
      sentences.append((tokens, tags, entities))
      tokens, tags = [], []
  return sentences


@pytest.mark.parametrize("domain", ["politics", "music"])
def test_crossner_spans_and_tags_are_the_raw_files_gold(load_task, raw_data_dir, domain):
  raw = raw_bio(raw_data_dir / f"crossner/ner_data/{domain}/test.txt")
  test = load_task("crossner", domain, "few_shot").splits["test"]
  assert len(test) == len(raw) == {"politics": 651, "music": 465}[domain]
  repeats = 0
  for ex, (tokens, tags, entities) in zip(test, raw):
    assert ex.text == " ".join(tokens)
    gold = [(t, " ".join(tokens[a:b])) for t, a, b in entities]
    assert [(s["type"], ex.text[s["start"]:s["end"]]) for s in ex.spans] == gold, ex.uid
    assert spans_lib.example_bio_tags(ex) == tags, ex.uid
    repeats += len(gold) != len(set(gold))
  assert repeats > 0  # the case search by value lost: the same entity mentioned twice


def raw_topv2_slots(parse):
  """(type, words) of each slot of a TOP parse, by opening bracket, nested words included."""
  slots, stack = [], []
  for token in parse.split():
    if token.startswith("["):
      stack.append(len(slots) if token.startswith("[SL:") else None)
      if token.startswith("[SL:"):
        slots.append((token[4:], []))
    elif token == "]":
      stack.pop()
    else:
      for i in stack:
        if i is not None:
          slots[i][1].append(token)
  return slots


def test_topv2_spans_by_hand(load_task):
  test = load_task("topv2", "weather", "few_shot").splits["test"]
  by_text = {ex.text: ex for ex in test}
  # weather_test.tsv, read by eye: the parse's tokens ("5 pm") are the utterance's ("5pm") split up
  for text, expected in [
      ("What will the weather be for Flowood, MS tomorrow at 11am?",  # line 283
       [("LOCATION", "Flowood, MS"), ("DATE_TIME", "tomorrow at 11am")]),
      ("Will there be rain in my current location?",  # line 4415: a slot inside a slot
       [("WEATHER_ATTRIBUTE", "rain"), ("LOCATION", "my current location"), ("LOCATION_USER", "my current location")]),
      ("what's the local radar", [("LOCATION", "local"), ("LOCATION_MODIFIER", "local")]),  # line 5525
  ]:
    ex = by_text[text]
    assert [(s["type"], ex.text[s["start"]:s["end"]]) for s in ex.spans] == expected


def test_topv2_spans_cover_exactly_each_slots_words(load_task, raw_data_dir):
  test = load_task("topv2", "weather", "few_shot").splits["test"]
  with open(raw_data_dir / "topv2/weather_test.tsv", encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
  assert len(rows) == len(test)
  repeats = 0
  for ex, (_, utterance, parse) in zip(test, rows):
    slots = raw_topv2_slots(parse)
    assert ex.text == utterance and len(ex.spans) == len(slots)
    for s, (kind, words) in zip(ex.spans, slots):
      surface = ex.text[s["start"]:s["end"]]
      assert s["type"] == kind and re.sub(r"\s", "", surface) == "".join(words), (ex.uid, s)
      assert surface == surface.strip()
    repeats += len(slots) != len({(k, " ".join(w)) for k, w in slots})
  assert repeats > 0


def test_example_bio_tags_come_from_the_gold_spans_not_from_the_values():
  text = "Queen met queen Elizabeth"
  ex = Example("m/0", "music", text, {"entities": ("band", "person")}, ("Queen", "queen Elizabeth"),
               (("band", "Queen"), ("person", "queen Elizabeth")),
               ({"type": "band", "start": 0, "end": 5}, {"type": "person", "start": 10, "end": 25}))
  assert spans_lib.example_bio_tags(ex) == ["B-band", "O", "B-person", "I-person"]
  unlabelled = Example("m/1", "music", text, {"entities": ("band",)}, ("Queen",), (("band", "Queen"),))
  with pytest.raises(ValueError, match=r"m/1: typed values .* but no gold spans"):
    spans_lib.example_bio_tags(unlabelled)


def test_whole_word_search_on_generated_text():
  assert spans_lib.whole_word("art").search("a party") is None
  assert spans_lib.whole_word("C++").search("I code c++ daily").span() == (7, 10)
  assert spans_lib.found_spans("Last night queen sang at the Grammy", [("band", "Queen"), ("award", "Grammy")]) == [
      {"type": "band", "value": "queen", "start": 11, "end": 16}, {"type": "award", "value": "Grammy", "start": 29, "end": 35}]
  assert spans_lib.found_spans("Queens of the Stone Age", [("band", "Queen")]) == []  # whole words only
