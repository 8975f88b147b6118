"""Labelled values as character spans of a text, and the BIO tags built from them.

Real examples carry their gold spans from the annotation (CrossNER's BIO tags, TOPv2's bracket
parse): repeated and overlapping mentions included. Generated text has no annotation, so there the
values the generator was asked for are searched for as whole words (`found_spans`).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Sequence

from msp_jax.data.example import Example, unique_in_order
from msp_jax.data.sources import DataError


@functools.lru_cache(maxsize=4096)
def whole_word(value: str) -> re.Pattern:
  """`value` as whole words, case-insensitively: "art" is not in "party", "Queen" is in "queen sang"."""
  return re.compile(r"(?<!\w)" + re.escape(value) + r"(?!\w)", flags=re.IGNORECASE)


def word_spans(text: str) -> list[tuple[int, int]]:
  """Character (start, end) of each whitespace-separated word: the unit BIO tags are given on."""
  return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def gold_spans(text: str, spans: Sequence[Mapping[str, Any]], where: str) -> tuple[tuple[dict, ...], tuple[tuple[str, str], ...]]:
  """Annotated spans as an Example stores them, each checked to lie in `text`, and the unique
  (type, surface string) pairs they hold, in order."""
  spans = tuple({"type": s["type"], "start": int(s["start"]), "end": int(s["end"])} for s in spans)
  for s in spans:
    if not 0 <= s["start"] <= s["end"] <= len(text):
      raise DataError(f"{where}: span {s} is outside the text {text!r} (length {len(text)}); "
                      "expected 0 <= start <= end <= length")
  return spans, unique_in_order((s["type"], text[s["start"]:s["end"]]) for s in spans)


def found_spans(text: str, typed_values: Sequence[tuple[str, str]]) -> list[dict]:
  """Spans {type, value, start, end} of the (type, value) pairs that occur in generated text: the first
  whole-word, case-insensitive match of each. Only for text without gold spans."""
  spans = []
  for t, value in typed_values:
    m = whole_word(value).search(text)
    if m is not None:
      spans.append({"type": t, "value": text[m.start():m.end()], "start": m.start(), "end": m.end()})
  return spans


def label_found_values(c: dict) -> float:
  """Sets a candidate's spans to the requested values found in its text and drops requested types with
  none found from its attributes; returns the share of requested values found (1.0 if none requested)."""
  typed = [tuple(tv) for tv in c["typed_values"]]
  c["spans"] = found_spans(c["text"], typed)
  missing = {t for t, _ in typed} - {s["type"] for s in c["spans"]}
  c["attributes"] = {k: [n for n in names if n not in missing] for k, names in c["attributes"].items()}
  return len(c["spans"]) / len(typed) if typed else 1.0


def bio_labels(types: Sequence[str]) -> list[str]:
  """Tag names by id: "O", then B-/I- of each type in sorted order."""
  return ["O"] + [f"{p}-{t}" for t in sorted(set(types)) for p in ("B", "I")]


def bio_tags(text: str, spans: Sequence[Mapping[str, Any]]) -> list[str]:
  """One tag per whitespace word of `text` from character spans [{"type", "start", "end"}].

  A word is inside a span when any of its characters is ("Paris." is tagged for the span "Paris").
  A span touching a word already tagged by an earlier span (by start) is dropped, so tags never
  interleave two entities.
  """
  words = word_spans(text)
  tags = ["O"] * len(words)
  for s in sorted(spans, key=lambda s: (s["start"], -s["end"])):
    start, end = int(s["start"]), int(s["end"])
    if not 0 <= start < end <= len(text):
      raise ValueError(f"bio_tags: span {dict(s)} is outside {text!r} (length {len(text)})")
    inside = [w for w, (ws, we) in enumerate(words) if ws < end and start < we]
    if any(tags[w] != "O" for w in inside):
      continue
    for k, w in enumerate(inside):
      tags[w] = ("B-" if k == 0 else "I-") + s["type"]
  return tags


def example_bio_tags(example: Example) -> list[str]:
  """Gold tags of an Example, from its gold spans (never re-found by searching its values)."""
  if example.typed_values and not example.spans:
    raise ValueError(f"example {example.uid}: typed values {list(example.typed_values)} but no gold spans; "
                     "gold tags come from the annotation's spans")
  return bio_tags(example.text, example.spans)
