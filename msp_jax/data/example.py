"""The one record type the prompt layout and batching see, whatever the dataset."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class Example:
  """One utterance with its attributes.

  `attributes` maps each attribute set of the ontology (e.g. "intents", "slots") to the sorted,
  unique attribute names of this utterance (possibly none). `values` are the attribute values the
  prompt shows before the exemplars (CrossNER entity strings, TOPv2 slot values, NLU++ slot names),
  in order of appearance. `typed_values` pairs each CrossNER entity / TOPv2 slot value with its type,
  (type, value), unique, so generated text can be asked for them and labelled with spans. `spans` are
  the gold annotation as character offsets into `text`, {"type", "start", "end"}, in order (TOPv2:
  by opening bracket, nested slots included; an empty slot is zero-width), repeated mentions
  included: every gold label is built from them. `uid` is unique within a task, e.g. "music/train/17".
  """
  uid: str
  domain: str
  text: str
  attributes: Mapping[str, tuple[str, ...]]
  values: tuple[str, ...] = ()
  typed_values: tuple[tuple[str, str], ...] = ()
  spans: tuple[Mapping[str, Any], ...] = ()

  def keys(self) -> frozenset[tuple[str, str]]:
    """(set, name) pairs: what exemplar retrieval overlaps on."""
    return frozenset((s, n) for s, names in self.attributes.items() for n in names)

  def restricted(self, allowed: Mapping[str, "set[str] | frozenset[str]"]) -> "Example":
    """The same utterance with only the allowed attributes per set (cross-domain evaluation); the spans
    of a type no longer among its attributes go too, so gold labels match them."""
    attributes = {s: tuple(n for n in names if n in allowed.get(s, ())) for s, names in self.attributes.items()}
    kept = {n for names in attributes.values() for n in names}
    return dataclasses.replace(self, attributes=attributes, spans=tuple(s for s in self.spans if s["type"] in kept))


def unique_sorted(names) -> tuple[str, ...]:
  return tuple(sorted(set(names)))


def unique_in_order(values) -> tuple[str, ...]:
  return tuple(dict.fromkeys(values))
