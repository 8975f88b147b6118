"""TOPv2 (Chen et al. 2020): compositional intent/slot parses in 8 domains, as TFDS.

Each TSV has a header and 3 tab-separated fields: domain, utterance, parse (the header calls the
parse `semantic_parse` in the full files and `seqlogical` in `low_resource_splits/`). Quoting is
off: six music utterances start with `"`, which csv's default quoting silently strips.
"""
from __future__ import annotations

import csv
import functools
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from msp_jax.data.example import Example, unique_in_order, unique_sorted
from msp_jax.data.ontology import readable
from msp_jax.data.sources import DataError, LocalDatasetInfo, RawFilesBuilder, rows
from msp_jax.data.spans import gold_spans

DOMAINS = ("alarm", "event", "messaging", "music", "navigation", "reminder", "timer", "weather")
SPLITS = ("train", "eval", "test")
LOW_RESOURCE_DOMAINS = ("reminder", "weather")
SPIS = (10, 25, 50, 100, 250, 500, 1000)  # samples per intent and slot
PARSE_COLUMNS = ("semantic_parse", "seqlogical")
_URL = "https://dl.fbaipublicfiles.com/TOPv2/TOPv2_Dataset.zip"  # Meta's official release (v1.1)
_LABEL = re.compile(r"\[(IN|SL):(\S+)")


def split_file(domain: str, split: str) -> str:
  return f"{domain}_{split}.tsv"


def low_resource_file(domain: str, split: str, spis: int) -> str:
  return f"low_resource_splits/{domain}_{split}_{spis}spis.tsv"


def low_resource_splits(domain: str) -> dict[str, str]:
  """TFDS split name (e.g. `train_25spis`) -> file, for the domains that have low-resource files."""
  if domain not in LOW_RESOURCE_DOMAINS:
    return {}
  return {f"{s}_{k}spis": low_resource_file(domain, s, k) for k in SPIS for s in ("train", "valid")}


def read_tsv(path: Path) -> Iterator[dict]:
  """Records {utterance, semantic_parse, intents, slots, spans}, checked line by line."""
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None or len(header) != 3 or header[:2] != ["domain", "utterance"] or header[2] not in PARSE_COLUMNS:
      raise DataError(f"{path}:1: header is {header!r}; expected domain, utterance, "
                      f"and {' or '.join(PARSE_COLUMNS)} separated by tabs")
    for row in reader:
      where = f"{path}:{reader.line_num}"
      if len(row) != 3:
        raise DataError(f"{where}: {len(row)} tab-separated fields; expected 3 ({', '.join(header)})")
      intents, slots = parse_labels(row[2], where)
      yield {"utterance": row[1], "semantic_parse": row[2], "intents": intents, "slots": slots,
             "spans": slot_spans(row[1], row[2], where)}


def parse_labels(parse: str, where: str = "parse") -> tuple[list[str], list[dict]]:
  """The intents (in order, nested ones included) and slots {type, value} of a TOP bracket parse.

  A slot's value is the words inside it, nested labels left out:
  `[SL:RECURRING_DATE_TIME [IN:GET_RECURRING_DATE_TIME [SL:DATE_TIME at 8 am ] ] ]` has value "at 8 am".
  """
  intents, slots, words = _parse(parse, where)
  return intents, [{"type": t, "value": " ".join(words[first:end])} for t, first, end in slots]


def slot_spans(utterance: str, parse: str, where: str = "parse") -> list[dict]:
  """The slots of a parse as character spans {type, start, end} of the utterance, in parse order.

  The parse's words are the utterance tokenized ("7:20am" is `7 : 20 am`), so each is found where the
  previous one ended, past whitespace only; a slot covers its first word's start to its last word's
  end. An empty slot (`[SL:DATE_TIME ]`, 24 in the release) is zero-width where its next word starts.
  """
  _, slots, words = _parse(parse, where)
  starts, ends, position = [], [], 0
  for word in words:
    while position < len(utterance) and utterance[position].isspace():
      position += 1
    if not utterance.startswith(word, position):
      raise DataError(f"{where}: parse word {word!r} is not at character {position} of the utterance "
                      f"{utterance!r}; expected the parse's words to be the utterance's, in order")
    starts.append(position)
    position += len(word)
    ends.append(position)
  if utterance[position:].strip():
    raise DataError(f"{where}: utterance {utterance!r} goes on after the parse's last word ({utterance[position:]!r})")
  starts.append(len(utterance.rstrip()))  # where an empty slot at the very end sits
  return [{"type": t, "start": starts[first], "end": ends[end - 1] if end > first else starts[first]}
          for t, first, end in slots]


def _parse(parse: str, where: str) -> tuple[list[str], list[tuple[str, int, int]], list[str]]:
  """(intents, slots as (type, first word, end word), words) of a TOP bracket parse; slots in reading
  order (by opening bracket), word indices into the parse's words, labels left out."""
  intents, slots, words, stack = [], [], [], []  # stack: (kind, slot index)
  for token in parse.split():
    if token.startswith("["):
      match = _LABEL.fullmatch(token)
      if not match:
        raise DataError(f"{where}: field 'semantic_parse' has label {token!r}; expected [IN:<NAME> or [SL:<NAME>")
      kind, label = match.groups()
      if kind == "IN":
        intents.append(label)
      else:  # listed where it opens, closed where it closes: slots in reading order
        slots.append([label, len(words), len(words)])
      stack.append((kind, len(slots) - 1))
    elif token == "]":
      if not stack:
        raise DataError(f"{where}: field 'semantic_parse' closes more brackets than it opens: {parse!r}")
      kind, slot = stack.pop()
      if kind == "SL":
        slots[slot][2] = len(words)
    else:
      words.append(token)
  if stack or not intents:
    raise DataError(f"{where}: field 'semantic_parse' is {parse!r}; expected one balanced [IN:...] tree")
  return intents, [tuple(s) for s in slots], words


@functools.lru_cache(maxsize=None)
def labels_used(paths: tuple[Path, ...]) -> dict[str, frozenset[str]]:
  """{"intents": ..., "slots": ...}: the label names some TSV files use (a regex scan, no parsing)."""
  found = {"IN": set(), "SL": set()}
  for path in paths:
    for kind, name in _LABEL.findall(Path(path).read_text(encoding="utf-8")):
      found[kind].add(name)
  return {"intents": frozenset(found["IN"]), "slots": frozenset(found["SL"])}


def label_attributes(used: dict[str, dict[str, frozenset[str]]], domain: str) -> dict[str, dict]:
  """{"intents": {...}, "slots": {...}} of one domain, from the labels each domain uses (`labels_used`
  over its files); an attribute is general when two or more domains use it."""
  return {kind: {name: {"description": readable(name), "general": sum(name in u[kind] for u in used.values()) > 1}
                 for name in sorted(used[domain][kind])}
          for kind in ("intents", "slots")}


def to_example(record: dict, uid: str, domain: str) -> Example:
  """Attributes: intents and slot types, two sets. Spans: the gold slots. Values: the slots' text as
  the utterance writes it ("at 8am", where the parse's tokens read "at 8 am")."""
  spans, typed_values = gold_spans(record["utterance"], rows(record["spans"]), uid)
  return Example(uid=uid, domain=domain, text=record["utterance"],
                 attributes={"intents": unique_sorted(record["intents"]), "slots": unique_sorted(s["type"] for s in spans)},
                 values=unique_in_order(v for _, v in typed_values), typed_values=typed_values, spans=spans)


class Topv2(RawFilesBuilder):
  """TOPv2 as TFDS: one config per domain; splits train, eval, test (+ train_/valid_<K>spis)."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "gold slot spans in character offsets of the utterance"}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=d, description=f"TOPv2 {d} domain") for d in DOMAINS]
  FOLDER = "topv2"
  SOURCE = f"{_URL} (Meta's official TOPv2 release; unzip it as <root>/topv2/)"

  def _info(self):
    return LocalDatasetInfo(
        builder=self, description=__doc__, homepage="https://arxiv.org/abs/2010.03546",
        features=tfds.features.FeaturesDict({
            "utterance": tfds.features.Text(),
            "semantic_parse": tfds.features.Text(),
            "intents": tfds.features.Sequence(tfds.features.Text()),
            "slots": tfds.features.Sequence({"type": tfds.features.Text(), "value": tfds.features.Text()}),
            "spans": tfds.features.Sequence({
                "type": tfds.features.Text(),
                "start": tfds.features.Scalar(np.int32), "end": tfds.features.Scalar(np.int32),
            }),
        }),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def required_files(self) -> list[str]:
    # Every domain's files: whether a label is general depends on the other domains.
    return [split_file(d, s) for d in DOMAINS for s in SPLITS] + list(low_resource_splits(self.builder_config.name).values())

  def download_files(self, dl_manager) -> dict[str, Path]:
    folder = Path(dl_manager.download_and_extract(_URL)) / "TOPv2_Dataset"
    return {f: folder / f for f in self.required_files()}

  def _split_generators(self, dl_manager):
    files = self.raw_files(dl_manager)
    domain = self.builder_config.name
    used = {d: labels_used(tuple(files[split_file(d, s)] for s in SPLITS)) for d in DOMAINS}
    self.info.metadata["attributes"] = label_attributes(used, domain)
    splits = {s: split_file(domain, s) for s in SPLITS} | low_resource_splits(domain)
    return {name: self._generate_examples(files[f]) for name, f in splits.items()}

  def _generate_examples(self, path):
    yield from enumerate(read_tsv(path))
