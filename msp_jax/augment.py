"""EDA baseline (Wei & Zou, 2019): synonym replacement, random insertion, random swap and random
deletion of words, offline and deterministic from a numpy Generator.

Unlike the original augmenter, labelled values (CrossNER entities, TOPv2 slot values) survive: the
words of each protected character span form one unit that is never replaced, deleted or split, only
moved whole by a swap, and each augmented text comes with the new spans of those values.

No pip-installable package ships WordNet synonyms inside its wheel (wn, nltk and textblob download
the data at run time; wordnet-lookup ships only a word list), so synonyms come from a callable;
`embedding_synonyms` builds one from a frozen backbone's input embeddings.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, NamedTuple, Sequence

import numpy as np

from msp_jax.data.example import Example
from msp_jax.data.spans import whole_word, word_spans

Synonyms = Callable[[str], Sequence[str]]


class Augmented(NamedTuple):
  text: str
  spans: tuple[tuple[int, int], ...]  # new (start, end) of each protected span, in the given order


@dataclasses.dataclass
class _Unit:
  """One whitespace word, or the words covering protected spans (offsets relative to the unit)."""
  text: str
  spans: tuple[tuple[int, int, int], ...] = ()  # (index of the protected span, start, end)

  @property
  def protected(self) -> bool:
    return bool(self.spans)


def _units(text: str, protected_spans: Sequence[tuple[int, int]]) -> list[_Unit]:
  words = word_spans(text)
  groups = list(range(len(words)))  # word -> first word of its unit
  for start, end in protected_spans:
    inside = [k for k, (ws, we) in enumerate(words) if ws < end and start < we]
    if start >= end or not inside or start < words[inside[0]][0] or end > words[inside[-1]][1]:
      raise ValueError(f"protected span {(start, end)} is empty or starts/ends in whitespace: {text!r}")
    for k in range(inside[0] + 1, inside[-1] + 1):
      groups[k] = groups[inside[0]]
  for k in range(1, len(words)):  # chains: a span joining 2-3 and another joining 1-2
    if groups[k] != k:
      groups[k] = groups[groups[k]]
  units: list[_Unit] = []
  for k, (ws, _) in enumerate(words):
    if groups[k] != k:
      continue
    last = max(j for j in range(k, len(words)) if groups[j] == k)
    unit_start, unit_end = ws, words[last][1]
    spans = tuple((i, s - unit_start, e - unit_start) for i, (s, e) in enumerate(protected_spans)
                  if unit_start <= s and e <= unit_end)
    units.append(_Unit(text[unit_start:unit_end], spans))
  return units


def _render(units: Sequence[_Unit], n_spans: int) -> Augmented:
  spans: list[tuple[int, int] | None] = [None] * n_spans
  pieces, offset = [], 0
  for u in units:
    for i, s, e in u.spans:
      spans[i] = (offset + s, offset + e)
    pieces.append(u.text)
    offset += len(u.text) + 1
  return Augmented(" ".join(pieces), tuple(spans))


_AFFIX = re.compile(r"^(\W*)(.*?)(\W*)$", flags=re.DOTALL)


def _synonym_of(word: str, synonyms: Synonyms, rng: np.random.Generator) -> str | None:
  """A random synonym of the word's core, keeping punctuation around it and a leading capital."""
  lead, core, trail = _AFFIX.match(word).groups()
  options = [s for s in synonyms(core) if s and s.lower() != core.lower()] if core else []
  if not options:
    return None
  choice = options[int(rng.integers(len(options)))]
  if core[0].isupper() and choice[0].islower():
    choice = choice[0].upper() + choice[1:]
  return lead + choice + trail


def _replace(units: list[_Unit], n: int, rng: np.random.Generator, synonyms: Synonyms) -> list[_Unit]:
  units, done = list(units), 0
  for k in rng.permutation(len(units)):
    if done == n:
      break
    if not units[k].protected and (new := _synonym_of(units[k].text, synonyms, rng)) is not None:
      units[k], done = _Unit(new), done + 1
  return units


def _insert(units: list[_Unit], n: int, rng: np.random.Generator, synonyms: Synonyms) -> list[_Unit]:
  units = list(units)
  for _ in range(n):
    for k in rng.permutation(len(units)):
      if not units[k].protected and (new := _synonym_of(units[k].text, synonyms, rng)) is not None:
        units.insert(int(rng.integers(len(units) + 1)), _Unit(new))
        break
  return units


def _swap(units: list[_Unit], n: int, rng: np.random.Generator) -> list[_Unit]:
  units = list(units)
  if len(units) < 2:
    return units
  for _ in range(n):
    a, b = rng.choice(len(units), size=2, replace=False)
    units[a], units[b] = units[b], units[a]
  return units


def _delete(units: list[_Unit], p: float, rng: np.random.Generator) -> list[_Unit]:
  drop = rng.random(len(units)) < p
  kept = [u for u, d in zip(units, drop) if u.protected or not d]
  return kept if kept else [units[int(rng.integers(len(units)))]]  # never an empty text


def eda(text: str, rng: np.random.Generator, alpha: float = 0.1, num_aug: int = 4,
        protected_spans: Sequence[tuple[int, int]] = (), synonyms: Synonyms | None = None) -> list[Augmented]:
  """num_aug EDA variants of text, each with the new character spans of `protected_spans`.

  Operations take turns (replacement, insertion, swap, deletion; only swap and deletion without
  `synonyms`); each changes max(1, int(alpha * units)) units, deletion drops each unprotected unit with
  probability alpha. Words are whitespace tokens, re-joined with single spaces; a variant can equal
  the input when its operation finds nothing to change (e.g. no synonyms).
  """
  units = _units(text, protected_spans)
  if not units:
    return [Augmented(text, tuple(protected_spans))] * num_aug
  n_change = max(1, int(alpha * len(units)))
  operations = [lambda u: _swap(u, n_change, rng), lambda u: _delete(u, alpha, rng)]
  if synonyms is not None:
    operations = [lambda u: _replace(u, n_change, rng, synonyms),
                  lambda u: _insert(u, n_change, rng, synonyms)] + operations
  return [_render(operations[j % len(operations)](units), len(protected_spans)) for j in range(num_aug)]


def embedding_synonyms(embeddings: np.ndarray, tokenizer, k: int = 5) -> Synonyms:
  """Synonyms as the k nearest whole-word vocabulary entries by cosine similarity of a frozen
  backbone's input embeddings [V, D].

  Whole words are single tokens that start a word (decode with a leading space, or carry the
  byte-level "Ġ" / SentencePiece "▁" marker) and are alphabetic. A word not in that vocabulary (also
  tried lowercased) has no synonyms. Keeps a normalised float32 copy of the whole-word rows.
  """
  size = min(int(embeddings.shape[0]), len(tokenizer))
  ids, words = [], []
  for i in range(size):
    token = tokenizer.convert_ids_to_tokens(i)
    if not token:
      continue
    decoded = tokenizer.decode([i])
    word = decoded.strip()
    if (decoded.startswith(" ") or token[0] in "Ġ▁") and word.isalpha():
      ids.append(i)
      words.append(word)
  matrix = np.asarray(embeddings[ids], dtype=np.float32)
  matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
  row_of: dict[str, int] = {}
  for r, w in enumerate(words):
    row_of.setdefault(w, r)

  @functools.lru_cache(maxsize=65536)
  def lookup(word: str) -> tuple[str, ...]:
    row = row_of.get(word, row_of.get(word.lower()))
    if row is None:
      return ()
    order = np.argsort(-(matrix @ matrix[row]), kind="stable")
    found: list[str] = []
    for r in order:
      w = words[r]
      if w.lower() != word.lower() and w not in found:
        found.append(w)
        if len(found) == k:
          break
    return tuple(found)

  return lambda word: list(lookup(word))


def _locate(text: str, typed_values: Sequence[tuple[str, str]]) -> list[tuple[int, tuple[int, int]]]:
  """(index into typed_values, span) of each value found as whole words, spans not overlapping."""
  found: list[tuple[int, tuple[int, int]]] = []
  for i, (_, value) in enumerate(typed_values):
    for m in whole_word(value).finditer(text):
      if m.end() > m.start() and all(m.end() <= s or e <= m.start() for _, (s, e) in found):
        found.append((i, (m.start(), m.end())))
        break
  return found


def augment_examples(examples: Sequence[Example], num_per_example: int, rng: np.random.Generator,
                     synonyms: Synonyms | None, alpha: float = 0.1) -> list[Example]:
  """EDA copies of each example ("{uid}/eda{j}") with the same attributes.

  Labelled values are protected, so their labels stay true: the gold spans when the example has them
  (every mention; they come back at their new offsets; a zero-width span, an empty TOPv2 slot, has no
  words and is dropped), else its typed values found in the text. typed_values, and values when they
  are exactly those values, are reordered by their new position (both are "in order of appearance").
  A typed value not found in the text has nothing to protect.
  """
  out = []
  for ex in examples:
    gold = [s for s in ex.spans if s["start"] < s["end"]]
    if ex.spans:
      protected = [(s["start"], s["end"]) for s in gold]
      keys = [(s["type"], ex.text[s["start"]:s["end"]]) for s in gold]
    else:
      located = _locate(ex.text, ex.typed_values)
      protected = [span for _, span in located]
      keys = [ex.typed_values[i] for i, _ in located]
    variants = eda(ex.text, rng, alpha=alpha, num_aug=num_per_example, protected_spans=protected, synonyms=synonyms)
    for j, variant in enumerate(variants):
      position = {}
      for key, (start, _) in zip(keys, variant.spans):
        position[key] = min(start, position.get(key, start))
      typed = tuple(sorted(ex.typed_values, key=lambda tv: position.get(tv, len(variant.text))))
      values = ex.values
      if ex.typed_values and set(values) == {v for _, v in ex.typed_values}:
        first = {}
        for _, v in typed:
          first.setdefault(v, len(first))
        values = tuple(sorted(values, key=first.__getitem__))
      spans = tuple(sorted(({"type": s["type"], "start": a, "end": b} for s, (a, b) in zip(gold, variant.spans)),
                           key=lambda s: s["start"]))
      out.append(dataclasses.replace(ex, uid=f"{ex.uid}/eda{j}", text=variant.text, values=values,
                                     typed_values=typed, spans=spans))
  return out
