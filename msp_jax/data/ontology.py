"""The attribute vocabulary of a task: named attribute sets, each attribute with a description.

Each attribute gets one soft prompt, initialised from its description, and its index in the sorted
names is its row in the prompt bank. Sorting makes the ids independent of file order and of Python's
hash seed (the original's attribute order changed from run to run). `general` marks attributes that
are shared across domains (NLU++'s "general" intents, CoNLL's four entity types, TOPv2 labels used
in two or more domains); the cross-domain setting evaluates on those only.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Mapping, Sequence

from msp_jax.data.sources import DataError


def readable(name: str) -> str:
  """`GET_WEATHER` -> "get weather", `cancel_close_leave_freeze` -> "cancel close leave freeze"."""
  return name.replace("_", " ").lower()


@dataclasses.dataclass(frozen=True)
class Attribute:
  name: str          # as in the data, e.g. "GET_WEATHER", "musicalartist", "card"
  description: str   # natural language, initialises the soft prompt
  general: bool      # shared across domains (vs specific to one)


@dataclasses.dataclass(frozen=True)
class AttributeSet:
  """One kind of attribute (intents, slots, entities); `attributes` sorted by name."""
  name: str
  attributes: tuple[Attribute, ...]

  def __post_init__(self):
    names = [a.name for a in self.attributes]
    if names != sorted(set(names)):
      raise ValueError(f"attribute set {self.name!r}: names must be unique and sorted, got {names[:5]}...")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(a.name for a in self.attributes)

  @property
  def descriptions(self) -> tuple[str, ...]:
    return tuple(a.description for a in self.attributes)

  @functools.cached_property
  def _index(self) -> dict[str, int]:
    return {a.name: i for i, a in enumerate(self.attributes)}

  def index(self, name: str) -> int:
    if name not in self._index:
      raise DataError(f"attribute set {self.name!r}: unknown attribute {name!r}; valid: {', '.join(self.names)}")
    return self._index[name]

  def __contains__(self, name: str) -> bool:
    return name in self._index

  def __len__(self) -> int:
    return len(self.attributes)


@dataclasses.dataclass(frozen=True)
class Ontology:
  """The attribute sets of a task, in a fixed order (the S axis of attribute ids), and its domains.

  `domains` lists every domain of the dataset, sorted, so a domain id means the same in every
  setting of that dataset.
  """
  dataset: str
  sets: tuple[AttributeSet, ...]
  domains: tuple[str, ...]

  @property
  def set_names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.sets)

  def __getitem__(self, set_name: str) -> AttributeSet:
    for s in self.sets:
      if s.name == set_name:
        return s
    raise DataError(f"{self.dataset}: unknown attribute set {set_name!r}; valid: {', '.join(self.set_names)}")

  def domain_id(self, domain: str) -> int:
    if domain not in self.domains:
      raise DataError(f"{self.dataset}: unknown domain {domain!r}; valid: {', '.join(self.domains)}")
    return self.domains.index(domain)

  def ids(self, attributes: Mapping[str, Sequence[str]]) -> tuple[tuple[int, ...], ...]:
    """Sorted attribute ids per set (in `sets` order) of an example's attribute names."""
    return tuple(tuple(sorted(s.index(n) for n in set(attributes.get(s.name, ())))) for s in self.sets)

  def only_general(self) -> "Ontology":
    return dataclasses.replace(self, sets=tuple(
        AttributeSet(s.name, tuple(a for a in s.attributes if a.general)) for s in self.sets))

  def to_json(self) -> dict:
    """Plain JSON (for checkpoint metadata and `python -m msp_jax.data --json`)."""
    return {"dataset": self.dataset, "domains": list(self.domains),
            "sets": {s.name: [dataclasses.asdict(a) for a in s.attributes] for s in self.sets}}

  @classmethod
  def from_json(cls, data: Mapping) -> "Ontology":
    return cls(data["dataset"], tuple(AttributeSet(name, tuple(Attribute(**a) for a in attrs))
                                      for name, attrs in data["sets"].items()), tuple(data["domains"]))

  @classmethod
  def from_metadata(cls, dataset: str, metadata: Mapping, domains: Iterable[str]) -> "Ontology":
    """From a builder's `info.metadata["attributes"]`: {set: {name: {description, general}}}."""
    return cls(dataset, tuple(
        AttributeSet(set_name, tuple(Attribute(n, a["description"], bool(a["general"])) for n, a in sorted(attrs.items())))
        for set_name, attrs in metadata["attributes"].items()), tuple(sorted(domains)))


def merge(ontologies: Sequence[Ontology]) -> Ontology:
  """The union of several domains' ontologies (same dataset and sets); the first description wins."""
  first = ontologies[0]
  sets = []
  for set_name in first.set_names:
    union: dict[str, Attribute] = {}
    for o in ontologies:
      for a in o[set_name].attributes:
        union.setdefault(a.name, a)
    sets.append(AttributeSet(set_name, tuple(union[n] for n in sorted(union))))
  return Ontology(first.dataset, tuple(sets), first.domains)
