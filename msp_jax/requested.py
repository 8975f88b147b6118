"""What generate.py is asked for: per seed (the default), a requests file, or balancing the seed set.

Per seed (`plan_requests`): `num_generations` requests per seed example, mostly the seed's own
attributes and a `combination_fraction` of new combinations drawn from the attributes' observed
co-occurrence, with values seen with each type.

A requests file (`--config.requests=FILE`) has one JSON object a line:

  {"attributes": {"intents": ["cancel_order", "refund"], "urgency": ["high"]}, "count": 5}
  {"attributes": {"entities": {"person": ["Ada Lovelace"], "location": []}}, "count": 2, "domain": "news"}

A set whose attributes are span types (entity data) may map each type to the values the text must
contain; a type without values gets one seen with it in the seed set. Each line is generated `count`
times (default 1; at least: later rounds re-request what denoising removed, up to
`max_generation_rounds` rounds; the summary names any line still short); a line's exemplars, domain and the
text denoising compares with come from the seed example sharing the most attributes with it.

Balance (`--config.balance=N`): requests until every attribute of the seed set has at least N
examples, counting the seeds; the rarest first. Each request reuses a seed that has the attribute, with
that seed's attributes and values, so the label combinations stay ones the data has.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
from typing import Sequence

import numpy as np

from msp_jax.data.example import Example
from msp_jax.errors import MspError

@dataclasses.dataclass(frozen=True)
class Request:
  index: int
  seed: Example
  attributes: dict            # set name -> sorted tuple of attribute names
  typed_values: tuple         # (type, value) pairs the text must contain (CrossNER/TOPv2)
  values: tuple               # what the prompt shows
  kind: str                   # "seed" | "combination"


def cooccurrence(seeds: Sequence[Example]) -> dict:
  """(set, name) -> set of keys seen in the same example."""
  graph = collections.defaultdict(set)
  for ex in seeds:
    keys = ex.keys()
    for k in keys:
      graph[k] |= keys - {k}
  return graph


def plan_requests(seeds: Sequence[Example], num_generations: int, combination_fraction: float,
                  rng: np.random.Generator, max_values: int = 0) -> list[Request]:
  """`num_generations` requests per seed, deterministic given rng. `max_values` > 0: a request asks for
  at most that many (type, value) pairs, a seeded choice, and only their types (a small LM leaves out
  most of a CrossNER sentence's ~6 values, and each one left out becomes a false "O" downstream)."""
  graph = cooccurrence(seeds)
  values_of = collections.defaultdict(list)  # type -> values seen with it, for new combinations
  for ex in seeds:
    for t, v in ex.typed_values:
      values_of[t].append(v)
  requests = []
  for seed in seeds:
    for _ in range(num_generations):
      keys = set(seed.keys())
      kind = "seed"
      if keys and rng.random() < combination_fraction:
        anchor = sorted(keys)[rng.integers(len(keys))]
        partners = sorted(graph[anchor] - keys)
        if partners:
          kind = "combination"
          added = partners[rng.integers(len(partners))]
          others = sorted(keys - {anchor})
          if others and rng.random() < 0.5:  # swap one attribute out as well: an unseen set is likelier
            keys.discard(others[rng.integers(len(others))])
          keys.add(added)
      attributes = {s: tuple(sorted(n for (ks, n) in keys if ks == s)) for s in seed.attributes}
      types = {n for _, n in keys}
      typed = [(t, v) for t, v in seed.typed_values if t in types]
      for t in sorted(types - {t for t, _ in typed}):
        if values_of.get(t):
          typed.append((t, values_of[t][rng.integers(len(values_of[t]))]))
      if max_values and len(typed) > max_values:
        value_types = {t for t, _ in typed}
        typed = [typed[i] for i in sorted(rng.choice(len(typed), max_values, replace=False))]
        dropped = value_types - {t for t, _ in typed}  # types now without a value (intents are not value types)
        attributes = {s: tuple(n for n in names if n not in dropped) for s, names in attributes.items()}
      values = tuple(v for _, v in typed) if seed.typed_values else seed.values
      requests.append(Request(len(requests), seed, attributes, tuple(typed), values, kind))
  return requests


LINE_FORMAT = '{"attributes": {set: [names]}, "count": N}'


class RequestError(MspError, ValueError):
  """A requests file line that cannot be generated; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Wanted:
  """One line of a requests file."""
  line: int
  attributes: dict             # set -> sorted tuple of names
  values: tuple                # (type, value) pairs the text must contain, as given
  count: int
  domain: str | None


def entity_types(seeds: Sequence[Example]) -> set[str]:
  """Attribute names that label spans in the seed set: their requests carry values."""
  return {t for ex in seeds for t, _ in ex.typed_values}


def read_requests(path: str, ontology, seeds: Sequence[Example]) -> list[Wanted]:
  """The file's lines, each checked against the trained vocabulary (`ontology`), or a one-line error."""
  try:
    lines = open(path, encoding="utf-8").read().splitlines()
  except OSError as e:
    raise RequestError(f"config.requests={path!r}: cannot read it ({e.strerror})") from None
  typed = entity_types(seeds)
  wanted = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      wanted.append(_parse(line, f"{path}:{number}", number, ontology, typed))
  if not wanted:
    raise RequestError(f"{path}: no requests; expected one {LINE_FORMAT} a line")
  return wanted


def _parse(line: str, where: str, number: int, ontology, typed: set[str]) -> Wanted:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise RequestError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); expected {LINE_FORMAT}") from None
  if not isinstance(row, dict) or not isinstance(row.get("attributes"), dict):
    raise RequestError(f"{where}: field 'attributes' is {row.get('attributes', 'missing') if isinstance(row, dict) else row!r}; "
                       f"expected {LINE_FORMAT}")
  extra = [k for k in row if k not in ("attributes", "count", "domain")]
  if extra:
    raise RequestError(f"{where}: unknown field {extra[0]!r}; valid: attributes, count, domain")
  count = row.get("count", 1)
  if not isinstance(count, int) or isinstance(count, bool) or count < 1:
    raise RequestError(f"{where}: field 'count' is {count!r}; expected a whole number >= 1")
  domain = row.get("domain")
  if domain is not None and domain not in ontology.domains:
    raise RequestError(f"{where}: field 'domain' is {domain!r}; {_close(str(domain), ontology.domains)}")
  attributes, values = {s: () for s in ontology.set_names}, []
  for set_name, names in row["attributes"].items():
    if set_name not in ontology.set_names:
      raise RequestError(f"{where}: attribute set {set_name!r} is not in the trained vocabulary; "
                         f"{_close(set_name, ontology.set_names)}")
    if isinstance(names, dict):
      for name, given in names.items():
        if name in ontology[set_name] and name not in typed:
          raise RequestError(f"{where}: field 'attributes.{set_name}.{name}' gives values, but {name!r} labels no span "
                             f"in the seed set; give {set_name} as a list of names")
        if not isinstance(given, list) or not all(isinstance(v, str) and v.strip() for v in given):
          raise RequestError(f"{where}: field 'attributes.{set_name}.{name}' is {given!r}; expected a list of values "
                             "(non-empty strings) the text must contain")
        values += [(name, v.strip()) for v in given]
      names = list(names)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise RequestError(f"{where}: field 'attributes.{set_name}' is {names!r}; expected a list of attribute names "
                         "or {name: [values]}")
    for name in names:
      if name not in ontology[set_name]:
        raise RequestError(f"{where}: attribute {set_name}/{name} is not in the trained vocabulary; "
                           f"{_close(name, ontology[set_name].names)}")
    attributes[set_name] = tuple(sorted(set(names)))
  return Wanted(number, attributes, tuple(values), count, domain)


def _close(name: str, valid: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
  return (f"close matches: {', '.join(close)}" if close else
          f"valid: {', '.join(list(valid)[:15])}{' ...' if len(valid) > 15 else ''}")


def closest_seed(keys: frozenset, seeds: Sequence[Example], domain: str | None, rng: np.random.Generator) -> Example:
  """The seed sharing most of `keys` (then with fewest others), of `domain` if given; ties at random."""
  pool = [ex for ex in seeds if domain is None or ex.domain == domain] or list(seeds)
  score = np.array([len(keys & ex.keys()) - 0.01 * len(ex.keys() - keys) for ex in pool])
  best = np.flatnonzero(score == score.max())
  return pool[int(best[rng.integers(len(best))])]


def seed_counts(seeds: Sequence[Example]) -> collections.Counter:
  return collections.Counter(k for ex in seeds for k in ex.keys())


def kept_counts(kept: Sequence[dict]) -> collections.Counter:
  return collections.Counter((s, n) for r in kept for s, names in r["attributes"].items() for n in names)


class Planner:
  """Plans each round's requests (indices from `offset`) and says when what was asked for is met."""

  def plan(self, round_: int, kept: list[dict], offset: int) -> list[Request]:
    raise NotImplementedError

  def shortfall(self, kept: list[dict]) -> dict:
    """What is still missing after denoising ({} when met)."""
    raise NotImplementedError


class PerSeed(Planner):
  """The default: `num_generations` requests per seed, some with new combinations; more rounds only
  while fewer than `target` are kept (the experiment grid sets one)."""

  def __init__(self, seeds, num_generations: int, combination_fraction: float, seed: int, target: int,
               max_values: int = 0):
    self.seeds, self.n, self.fraction, self.seed, self.target = seeds, num_generations, combination_fraction, seed, target
    self.max_values = max_values

  def plan(self, round_, kept, offset):
    rng = np.random.default_rng([self.seed, 1] if round_ == 0 else [self.seed, 1, round_])
    return [dataclasses.replace(r, index=offset + r.index)
            for r in plan_requests(self.seeds, self.n, self.fraction, rng, self.max_values)]

  def shortfall(self, kept):
    return {"examples": self.target - len(kept)} if len(kept) < self.target else {}


class FromFile(Planner):
  """Each line of a requests file `count` times; later rounds re-request each line's shortfall."""

  def __init__(self, wanted: list[Wanted], seeds, seed: int, keep_fraction: float):
    self.wanted, self.seeds, self.seed, self.keep_fraction = wanted, seeds, seed, keep_fraction
    self.line_of: dict[int, int] = {}  # request index -> position in `wanted`
    self.values_of = collections.defaultdict(list)
    for ex in seeds:
      for t, v in ex.typed_values:
        self.values_of[t].append(v)

  def kept_per_line(self, kept) -> collections.Counter:
    return collections.Counter(self.line_of[r["request"]] for r in kept if r["request"] in self.line_of)

  def plan(self, round_, kept, offset):
    rng = np.random.default_rng([self.seed, 1, round_])
    have = self.kept_per_line(kept)
    requests = []
    for i, w in enumerate(self.wanted):
      missing = w.count if round_ == 0 else math.ceil(max(0, w.count - have[i]) / self.keep_fraction)
      keys = frozenset((s, n) for s, names in w.attributes.items() for n in names)
      for _ in range(missing):
        seed = closest_seed(keys, self.seeds, w.domain, rng)
        typed = list(w.values)
        for t in sorted({n for _, n in keys} - {t for t, _ in typed}):
          if self.values_of.get(t):
            typed.append((t, self.values_of[t][rng.integers(len(self.values_of[t]))]))
        values = tuple(v for _, v in typed) if typed or seed.typed_values else seed.values
        index = offset + len(requests)
        self.line_of[index] = i
        requests.append(Request(index, seed, dict(w.attributes), tuple(typed), values, "requested"))
    return requests

  def shortfall(self, kept):
    have = self.kept_per_line(kept)
    return {f"line {w.line}": w.count - have[i] for i, w in enumerate(self.wanted) if have[i] < w.count}


class Balance(Planner):
  """Requests for every seed-set attribute with fewer than `minimum` examples (seeds + kept), rarest
  first, each on a seed that has it; a round asks for each deficit / keep_fraction."""

  def __init__(self, seeds, minimum: int, seed: int, keep_fraction: float):
    self.seeds, self.minimum, self.seed, self.keep_fraction = seeds, minimum, seed, keep_fraction
    self.seed_counts = seed_counts(seeds)

  def counts(self, kept) -> collections.Counter:
    return self.seed_counts + kept_counts(kept)

  def plan(self, round_, kept, offset):
    rng = np.random.default_rng([self.seed, 1, round_])
    counts = self.counts(kept)
    requests = []
    for key in sorted(self.seed_counts, key=lambda k: (counts[k], k)):
      deficit = self.minimum - counts[key]
      if deficit <= 0:
        continue
      having = [ex for ex in self.seeds if key in ex.keys()]
      order = rng.permutation(len(having))
      for j in range(math.ceil(deficit / self.keep_fraction)):
        seed = having[int(order[j % len(having)])]
        attributes = {s: tuple(names) for s, names in seed.attributes.items()}
        requests.append(Request(offset + len(requests), seed, attributes, seed.typed_values, seed.values, "balance"))
    return requests

  def shortfall(self, kept):
    counts = self.counts(kept)
    return {f"{s}/{n}": self.minimum - counts[s, n] for s, n in sorted(self.seed_counts) if counts[s, n] < self.minimum}
