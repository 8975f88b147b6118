"""NLU++ (PolyAI, Casanueva et al. 2022): multi-intent utterances in two domains, 20 folds each.

The dataset has no train/dev/test split, only folds; each fold is a TFDS split `fold0` ... `fold19`
(settings choose folds: see splits.py). An utterance without an `intents` key has no intent: it is
kept with an empty intent list (the original parser dropped those 362 utterances).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from msp_jax.data.example import Example, unique_in_order, unique_sorted
from msp_jax.data.ontology import readable
from msp_jax.data.sources import DataError, LocalDatasetInfo, RawFilesBuilder, rows

DOMAINS = ("banking", "hotels")
NUM_FOLDS = 20
ONTOLOGY_FILE = "data/ontology.json"
_COMMIT = "57ec275d8078"  # PolyAI-LDN/task-specific-datasets, 2022-04-29; the files in ../shared/data
_URL = f"https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/{_COMMIT}/nlupp/"


def fold_file(domain: str, fold: int) -> str:
  return f"data/{domain}/fold{fold}.json"


def read_fold(path: Path, fold: int) -> list[dict]:
  """One fold's examples as builder records; every field checked, errors name file/record/field."""
  try:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected a JSON array of examples") from None
  if not isinstance(data, list):
    raise DataError(f"{path}: top level is {type(data).__name__}; expected a JSON array of examples")
  return [_record(ex, f"{path}: example {i}", fold) for i, ex in enumerate(data)]


def _record(ex, where: str, fold: int) -> dict:
  if not isinstance(ex, dict) or not isinstance(ex.get("text"), str) or not ex["text"]:
    raise DataError(f"{where}: field 'text' is {ex.get('text') if isinstance(ex, dict) else ex!r}; "
                    "expected a non-empty string")
  intents = ex.get("intents", [])
  if not isinstance(intents, list) or not all(isinstance(i, str) for i in intents):
    raise DataError(f"{where}: field 'intents' is {intents!r}; expected a list of intent names")
  slots = ex.get("slots", {})
  if not isinstance(slots, dict):
    raise DataError(f"{where}: field 'slots' is {slots!r}; expected an object slot name -> {{text, span, value}}")
  records = []
  for name, slot in slots.items():
    span = slot.get("span") if isinstance(slot, dict) else None
    if not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)):
      raise DataError(f"{where}: field 'slots.{name}.span' is {span!r}; expected [start, end] character offsets")
    value = slot.get("value", slot.get("values"))
    records.append({"name": name, "text": str(slot.get("text", "")), "start": span[0], "end": span[1],
                    "value": json.dumps(value, sort_keys=True)})
  return {"text": ex["text"], "intents": intents, "slots": records, "fold": fold}


def intent_attributes(ontology_path: Path, domain: str) -> dict[str, dict]:
  """The intents of one domain from ontology.json: {name: {description, general}}.

  An intent belongs to the domain if tagged "general" or with the domain; it is general only if
  tagged "general" (`refund` is tagged banking and hotels: specific to both).
  """
  try:
    intents = json.loads(Path(ontology_path).read_text(encoding="utf-8"))["intents"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise DataError(f"{ontology_path}: cannot read field 'intents' ({e}); expected "
                    '{"intents": {name: {"description": str, "domain": [..]}}}') from None
  return {name: {"description": spec["description"], "general": "general" in spec["domain"]}
          for name, spec in intents.items() if "general" in spec["domain"] or domain in spec["domain"]}


def to_example(record: dict, uid: str, domain: str) -> Example:
  """Attributes: the intents. Values: the slot names, as the original prompt showed them."""
  slot_names = [slot["name"] for slot in rows(record["slots"])]
  return Example(uid=uid, domain=domain, text=record["text"],
                 attributes={"intents": unique_sorted(record["intents"])},
                 values=unique_in_order(readable(n) for n in slot_names))


class Nlupp(RawFilesBuilder):
  """NLU++ as TFDS: configs banking and hotels; splits fold0..fold19."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=d, description=f"NLU++ {d} domain") for d in DOMAINS]
  FOLDER = "nlupp"
  SOURCE = "https://github.com/PolyAI-LDN/task-specific-datasets (folder nlupp/)"
  FILE_URL = _URL

  def _info(self):
    return LocalDatasetInfo(
        builder=self, description=__doc__, homepage="https://github.com/PolyAI-LDN/task-specific-datasets",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "intents": tfds.features.Sequence(tfds.features.Text()),
            "slots": tfds.features.Sequence({
                "name": tfds.features.Text(), "text": tfds.features.Text(),
                "start": tfds.features.Scalar(np.int32), "end": tfds.features.Scalar(np.int32),
                "value": tfds.features.Text(),  # JSON, e.g. {"day": 16, "month": 3, "year": 2022}
            }),
            "fold": tfds.features.Scalar(np.int32),
        }),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def required_files(self) -> list[str]:
    return [fold_file(self.builder_config.name, f) for f in range(NUM_FOLDS)] + [ONTOLOGY_FILE]

  def download_files(self, dl_manager) -> dict[str, Path]:
    return dl_manager.download({f: _URL + f for f in self.required_files()})

  def _split_generators(self, dl_manager):
    files = self.raw_files(dl_manager)
    domain = self.builder_config.name
    self.info.metadata["attributes"] = {"intents": intent_attributes(files[ONTOLOGY_FILE], domain)}
    return {f"fold{f}": self._generate_examples(files[fold_file(domain, f)], f) for f in range(NUM_FOLDS)}

  def _generate_examples(self, path, fold):
    for i, record in enumerate(read_fold(path, fold)):
      yield i, record
