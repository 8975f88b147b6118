"""The prompt of one example, as segments: soft prompt slots by attribute id, then text, then target.

The model sees `[instruction prompt][mix of attribute prompts]` (built from `attribute_ids`) followed
by the tokens of

    "{values} in the {domain} domain:\n1) {exemplar 1}\n2) {exemplar 2}\n3) "

and then the target utterance (decoder-only), or the target as decoder input (T5). Keeping the
segments apart (no placeholder text) tells batching exactly where the loss goes.

Exemplars are training utterances of the same domain ranked by how many attributes they share with
the example, ties broken at random; k are drawn from the best `pool_size`. The example itself (and
exact copies of its text: TOPv2 repeats rows) is never its own exemplar. With too few sharing
partners the rest come at random from the same domain, or, for a domain without training data (cross
setting), from all of the training data.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Sequence

import numpy as np

from msp_jax.data.example import Example
from msp_jax.data.ontology import Ontology

# How a domain reads in the prompt, where its config name does not (the original also said "general").
DOMAIN_TEXT = {"conll2003": "general"}


@dataclasses.dataclass(frozen=True)
class Segments:
  """What batching needs of one example: soft prompt ids, the text, and the target (None to generate)."""
  uid: str
  attribute_ids: tuple[tuple[int, ...], ...]  # per attribute set, in ontology order
  domain_id: int
  text: str
  target: str | None


def prompt_text(values: Sequence[str], domain: str, exemplars: Sequence[str]) -> str:
  """`"{values} in the {domain} domain:\\n1) {ex1}\\n2) {ex2}\\n3) "`, numbered for any k."""
  numbered = "".join(f"{i}) {text}\n" for i, text in enumerate(exemplars, 1))
  return f"{', '.join(values)} in the {DOMAIN_TEXT.get(domain, domain)} domain:\n{numbered}{len(exemplars) + 1}) "


class ExemplarRetriever:
  """Training utterances that share attributes with a query, from the training split only."""

  def __init__(self, train: Sequence[Example], num_exemplars: int = 2, pool_size: int = 10):
    self.train, self.k, self.pool_size = list(train), num_exemplars, max(pool_size, num_exemplars)
    postings, by_domain, by_text = (collections.defaultdict(list) for _ in range(3))
    for i, ex in enumerate(self.train):
      for key in ex.keys() or {_NO_ATTRIBUTES}:
        postings[key].append(i)
      by_domain[ex.domain].append(i)
      by_text[ex.text].append(i)
    as_arrays = lambda lists: {key: np.asarray(ids) for key, ids in lists.items()}
    self._postings, self._by_domain, self._by_text = as_arrays(postings), as_arrays(by_domain), as_arrays(by_text)

  def __call__(self, keys: frozenset, domain: str, rng: np.random.Generator, exclude_text: str | None = None) -> list[Example]:
    """k exemplars for attribute `keys` ((set, name) pairs) in `domain`; never one whose text is exclude_text."""
    pool = self._by_domain.get(domain, np.arange(len(self.train)))
    overlap = np.zeros(len(self.train))
    for key in keys or {_NO_ATTRIBUTES}:
      overlap[self._postings.get(key, _NONE)] += 1
    overlap[self._by_text.get(exclude_text, _NONE)] = -1
    score = overlap[pool]
    pool, score = pool[score >= 0], score[score >= 0]
    priority = score + 0.5 * rng.random(len(pool))  # random order among equal overlaps only
    n_sharing = min(self.pool_size, int((score > 0).sum()))
    best = pool[np.argpartition(-priority, n_sharing - 1)[:n_sharing]] if n_sharing else _NONE
    chosen = rng.choice(best, size=min(self.k, len(best)), replace=False) if len(best) else _NONE
    if len(chosen) < self.k:  # fall back to any utterance of the domain
      rest = pool[~np.isin(pool, chosen)]
      chosen = np.concatenate([chosen, rng.choice(rest, size=min(self.k - len(chosen), len(rest)), replace=False)])
    return [self.train[i] for i in chosen]


_NONE = np.zeros(0, np.int64)
_NO_ATTRIBUTES = ("", "")  # utterances without attributes pair with each other


class PromptLayout:
  """Builds `Segments` for training examples and for generation requests."""

  def __init__(self, ontology: Ontology, train: Sequence[Example], num_exemplars: int = 2, pool_size: int = 10):
    self.ontology = ontology
    self.retriever = ExemplarRetriever(train, num_exemplars, pool_size)

  def segments(self, example: Example, rng: np.random.Generator, with_target: bool = True) -> Segments:
    exemplars = self.retriever(example.keys(), example.domain, rng, exclude_text=example.text)
    return Segments(example.uid, self.ontology.ids(example.attributes), self.ontology.domain_id(example.domain),
                    prompt_text(example.values, example.domain, [e.text for e in exemplars]),
                    example.text if with_target else None)

  def for_generation(self, attributes: Mapping[str, Sequence[str]], domain: str, rng: np.random.Generator,
                     values: Sequence[str] = (), uid: str = "generated") -> Segments:
    """The same layout for chosen attributes and no target: the model writes utterance k+1."""
    query = Example(uid, domain, "", {s: tuple(sorted(set(n))) for s, n in attributes.items()}, tuple(values))
    return self.segments(query, rng, with_target=False)
