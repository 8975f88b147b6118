"""CrossNER (Liu et al. 2021): named entities in five domains plus CoNLL-2003 news, as TFDS.

Files are CoNLL-style `token<TAB>BIO-tag` lines with a blank line between sentences. An entity that
ends a sentence is closed at the sentence break: the original MSP parser carried it over into the
next sentence (it closed an entity only at the next B- or O tag); 1,073 sentences end inside one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from msp_jax.data.example import Example, unique_in_order, unique_sorted
from msp_jax.data.sources import DataError, LocalDatasetInfo, RawFilesBuilder, rows
from msp_jax.data.spans import gold_spans

DOMAINS = ("ai", "conll2003", "literature", "music", "politics", "science")
SPLITS = ("train", "dev", "test")
CONLL_TYPES = frozenset({"location", "misc", "organisation", "person"})  # shared by every domain: general
# Readable names for the compound raw tags; the rest read as they are.
DESCRIPTIONS = {
    "academicjournal": "academic journal", "astronomicalobject": "astronomical object",
    "chemicalcompound": "chemical compound", "chemicalelement": "chemical element",
    "literarygenre": "literary genre", "misc": "miscellaneous", "musicalartist": "musical artist",
    "musicalinstrument": "musical instrument", "musicgenre": "music genre", "politicalparty": "political party",
    "programlang": "programming language",
}
_COMMIT = "2e7ba2a7798c"  # zliucr/CrossNER, 2021-01-05 ("fixed annotation errors"); the files in ../shared/data
_URL = f"https://raw.githubusercontent.com/zliucr/CrossNER/{_COMMIT}/"


def split_file(domain: str, split: str) -> str:
  return f"ner_data/{domain}/{split}.txt"


def read_conll(path: Path) -> Iterator[dict]:
  """Sentences {tokens, tags, entities, text, spans}: each entity {type, text, start, end} in token
  offsets; `text` is the tokens joined by single spaces and `spans` the same entities {type, start,
  end} in character offsets into it."""
  tokens, tags = [], []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip():
        if tokens:
          yield _sentence(tokens, tags)
        tokens, tags = [], []
        continue
      fields = line.split("\t")
      if len(fields) != 2 or not fields[0]:
        raise DataError(f"{path}:{number}: line {line!r} has {len(fields)} tab-separated fields; "
                        "expected 'token<TAB>tag' or a blank line between sentences")
      tag = fields[1]
      if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
        raise DataError(f"{path}:{number}: field 'tag' is {tag!r}; expected O, B-<type> or I-<type>")
      tokens.append(fields[0])
      tags.append(tag)
  if tokens:
    yield _sentence(tokens, tags)


def _sentence(tokens: list[str], tags: list[str]) -> dict:
  entities = entity_spans(tokens, tags)
  starts = [0]
  for token in tokens:
    starts.append(starts[-1] + len(token) + 1)  # +1: the joining space
  spans = [{"type": e["type"], "start": starts[e["start"]], "end": starts[e["end"]] - 1} for e in entities]
  return {"tokens": tokens, "tags": tags, "entities": entities, "text": " ".join(tokens), "spans": spans}


def entity_spans(tokens: list[str], tags: list[str]) -> list[dict]:
  """BIO -> spans. An I- tag that does not continue an entity of its type starts one (as conlleval)."""
  spans, start, kind = [], None, None
  for i, tag in enumerate(tags + ["O"]):  # the sentinel closes an entity at the sentence end
    continues = tag.startswith("I-") and tag[2:] == kind
    if start is not None and not continues:
      spans.append({"type": kind, "text": " ".join(tokens[start:i]), "start": start, "end": i})
      start, kind = None, None
    if tag != "O" and not continues:
      start, kind = i, tag[2:]
  return spans


def entity_attributes(types) -> dict[str, dict]:
  return {t: {"description": DESCRIPTIONS.get(t, t), "general": t in CONLL_TYPES} for t in types}


def to_example(record: dict, uid: str, domain: str) -> Example:
  """Attributes: the entity types. Values: the entity strings. Spans: the gold entities, every mention."""
  spans, typed_values = gold_spans(record["text"], rows(record["spans"]), uid)
  return Example(uid=uid, domain=domain, text=record["text"],
                 attributes={"entities": unique_sorted(s["type"] for s in spans)},
                 values=unique_in_order(v for _, v in typed_values), typed_values=typed_values, spans=spans)


class Crossner(RawFilesBuilder):
  """CrossNER as TFDS: one config per domain; splits train, dev, test."""
  name = "crossner"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "text and gold entity spans in character offsets"}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=d, description=f"CrossNER {d} domain") for d in DOMAINS]
  FOLDER = "crossner"
  SOURCE = "https://github.com/zliucr/CrossNER (folder ner_data/)"
  FILE_URL = _URL

  def _info(self):
    return LocalDatasetInfo(
        builder=self, description=__doc__, homepage="https://github.com/zliucr/CrossNER",
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Sequence(tfds.features.Text()),
            "tags": tfds.features.Sequence(tfds.features.Text()),
            "entities": tfds.features.Sequence({
                "type": tfds.features.Text(), "text": tfds.features.Text(),
                "start": tfds.features.Scalar(np.int32), "end": tfds.features.Scalar(np.int32),
            }),
            "text": tfds.features.Text(),
            "spans": tfds.features.Sequence({
                "type": tfds.features.Text(),
                "start": tfds.features.Scalar(np.int32), "end": tfds.features.Scalar(np.int32),
            }),
        }),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def required_files(self) -> list[str]:
    return [split_file(self.builder_config.name, s) for s in SPLITS]

  def download_files(self, dl_manager) -> dict[str, Path]:
    return dl_manager.download({f: _URL + f for f in self.required_files()})

  def _split_generators(self, dl_manager):
    files = self.raw_files(dl_manager)
    domain = self.builder_config.name
    sentences = {s: list(read_conll(files[split_file(domain, s)])) for s in SPLITS}
    types = sorted({e["type"] for split in sentences.values() for s in split for e in s["entities"]})
    self.info.metadata["attributes"] = {"entities": entity_attributes(types)}
    return {s: self._generate_examples(sentences[s]) for s in SPLITS}

  def _generate_examples(self, sentences):
    yield from enumerate(sentences)
