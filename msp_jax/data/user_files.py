"""Your own labelled utterances as a task (`--config.dataset=files --config.data_path=DIR`).

  DIR/train.jsonl       one example a line: {"text": "...", "attributes": {"intents": [...], "urgency": [...]}}
                        (any set names; a plain top-level "intents": [...] is read as a set too); optional
                        "spans": [{"type", "start", "end"}] in character offsets (entity data: a span's type
                        is an attribute of its row, in the set that lists it, else in set "entities") and
                        "domain" (default: the folder's name, "_" and "-" read as spaces)
  DIR/dev.jsonl         optional: without it a seeded share of train is held out as dev (splits.py)
  DIR/test.jsonl        optional
  DIR/{split}.txt       the same split as a CoNLL BIO file (token<TAB>tag, a blank line between
                        sentences; CrossNER's reader): set "entities"
  DIR/attributes.json   optional {set: {name: description}}; an attribute without one is described by
                        its name with "_" as spaces (the text its soft prompt starts from)

Every line is checked before anything is written: a bad one is a one-line error naming the file, the
line, the field and what is valid. The files are read once per process (cached by size and mtime) and
prepared as a TFDS dataset like the benchmarks, in `<tfds data_dir>/user_files/<folder>-<path hash>/`;
the raw files' hashes are recorded there, so a changed file rebuilds it.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from msp_jax.data import crossner, sources
from msp_jax.data.example import Example, unique_in_order
from msp_jax.data.ontology import readable
from msp_jax.data.sources import DataError, LocalDatasetInfo, RawFilesBuilder
from msp_jax.data.spans import gold_spans

DATASET = "files"
SPLITS = ("train", "dev", "test")
DESCRIPTIONS = "attributes.json"
ENTITIES = "entities"  # the set of span types no attribute set of their row lists (and of BIO files)
FIELDS = ("text", "attributes", "spans", "domain")
_WORD = re.compile(r"\w")
_FORMAT = '{"text": ..., "attributes": {set: [names]}}'


@dataclasses.dataclass(frozen=True)
class Folder:
  """A checked data folder: records per split present, the attribute sets, descriptions, domains."""
  path: Path
  files: dict                  # split -> file name in the folder
  records: dict                # split -> list of {"text", "attributes", "spans", "domain"}
  attributes: dict             # set -> {name: description}, every name of every split
  domains: tuple[str, ...]


def default_domain(path: Path) -> str:
  return re.sub(r"[_-]+", " ", Path(path).resolve().name).strip() or "general"


def split_files(path: Path) -> dict[str, str]:
  """Split -> its file's name (.jsonl or .txt); a split with both is ambiguous."""
  found = {}
  for split in SPLITS:
    names = [f"{split}{ext}" for ext in (".jsonl", ".txt") if (path / f"{split}{ext}").is_file()]
    if len(names) > 1:
      raise DataError(f"{path}: both {names[0]} and {names[1]}; keep one file per split")
    if names:
      found[split] = names[0]
  if "train" not in found:
    raise DataError(f"{path}: no train.jsonl or train.txt; expected one JSON object a line ({_FORMAT}) "
                    "or a CoNLL BIO file (token<TAB>tag)")
  return found


def read_folder(data_path: str) -> Folder:
  """The folder's examples, every line checked; read again only when a file's size or mtime changed."""
  path = Path(data_path).expanduser()
  if not path.is_dir():
    raise DataError(f"config.data_path={data_path!r}: no such folder; expected a folder with train.jsonl "
                    f"(one {_FORMAT} a line) or train.txt (CoNLL BIO)")
  names = list(split_files(path).values()) + ([DESCRIPTIONS] if (path / DESCRIPTIONS).is_file() else [])
  signature = tuple((n, (path / n).stat().st_size, (path / n).stat().st_mtime_ns) for n in names)
  return _read_folder(str(path.resolve()), signature)


@functools.lru_cache(maxsize=8)
def _read_folder(path: str, signature: tuple) -> Folder:
  del signature  # only the cache key
  path = Path(path)
  files = split_files(path)
  domain = default_domain(path)
  records = {}
  for split, name in files.items():
    read = read_bio if name.endswith(".txt") else read_jsonl
    records[split] = read(path / name, domain)
    if not records[split]:
      raise DataError(f"{path / name}: no examples; expected at least one (or remove the file"
                      f"{'' if split == 'train' else ': it is optional'})")
  sets = sorted({s for rows in records.values() for r in rows for s in r["attributes"]})
  if not any(n for r in records["train"] for names in r["attributes"].values() for n in names):
    raise DataError(f"{path / files['train']}: no example has an attribute; expected at least one labelled "
                    f"example: {_FORMAT}")
  for rows in records.values():
    for r in rows:  # every example names every set, so requests and labels can refer to any of them
      r["attributes"] = {s: r["attributes"].get(s, []) for s in sets}
  names = {s: sorted({n for rows in records.values() for r in rows for n in r["attributes"][s]}) for s in sets}
  descriptions = read_descriptions(path / DESCRIPTIONS, names) if (path / DESCRIPTIONS).is_file() else {}
  attributes = {s: {n: descriptions.get(s, {}).get(n) or readable(n) for n in names[s]} for s in sets}
  warn_unseen(path, files, records)
  return Folder(path, files, records, attributes, tuple(sorted({r["domain"] for rows in records.values() for r in rows})))


def read_jsonl(path: Path, domain: str) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        rows.append(parse_row(line, f"{path}:{number}", domain))
  return rows


def parse_row(line: str, where: str, domain: str) -> dict:
  """One JSONL line -> {"text", "attributes": {set: sorted names}, "spans", "domain"}, or a one-line error."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); expected one object a line: {_FORMAT}") from None
  if not isinstance(row, dict):
    raise DataError(f"{where}: a JSON {type(row).__name__}; expected one object a line: {_FORMAT}")
  text = row.get("text")
  if not isinstance(text, str) or not text.strip():
    raise DataError(f"{where}: field 'text' is {'missing' if 'text' not in row else repr(text)}; expected a non-empty string")
  if "attributes" in row:
    extra = [k for k in row if k not in FIELDS]
    if extra:
      raise DataError(f"{where}: unknown field {extra[0]!r}; valid: {', '.join(FIELDS)}")
    sets, prefix = row["attributes"], "attributes."
    if not isinstance(sets, dict):
      raise DataError(f"{where}: field 'attributes' is {sets!r}; expected an object {{set: [attribute names]}}")
  else:  # the plain form: every field but text, spans and domain is an attribute set
    sets, prefix = {k: v for k, v in row.items() if k not in FIELDS}, ""
  attributes = {}
  for set_name, names in sets.items():
    if not set_name or not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
      raise DataError(f"{where}: field '{prefix}{set_name}' is {names!r}; expected a list of attribute names "
                      "(non-empty strings)")
    attributes[set_name] = sorted({n.strip() for n in names})
  row_domain = row.get("domain", domain)
  if not isinstance(row_domain, str) or not row_domain.strip():
    raise DataError(f"{where}: field 'domain' is {row_domain!r}; expected a non-empty string")
  spans = check_spans(text, row.get("spans", []), where)
  listed = {n for names in attributes.values() for n in names}
  unlisted = sorted({s["type"] for s in spans} - listed)
  if unlisted:
    attributes[ENTITIES] = sorted(set(attributes.get(ENTITIES, [])) | set(unlisted))
  return {"text": text, "attributes": attributes, "spans": spans, "domain": row_domain.strip()}


def check_spans(text: str, spans, where: str) -> list[dict]:
  """Spans inside the text, non-empty, starting and ending at word boundaries (no cut words)."""
  if not isinstance(spans, list):
    raise DataError(f"{where}: field 'spans' is {spans!r}; expected a list of {{\"type\", \"start\", \"end\"}}")
  out = []
  for i, s in enumerate(spans):
    field = f"spans[{i}]"
    if not (isinstance(s, dict) and isinstance(s.get("type"), str) and s["type"].strip()
            and all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool) for k in ("start", "end"))):
      raise DataError(f"{where}: field '{field}' is {s!r}; expected {{\"type\": name, \"start\": int, \"end\": int}} "
                      "in character offsets")
    start, end = s["start"], s["end"]
    if not 0 <= start < end <= len(text):
      raise DataError(f"{where}: field '{field}' is [{start}, {end}), outside the text (length {len(text)}); "
                      f"expected 0 <= start < end <= {len(text)}")
    cut_start = start > 0 and _WORD.match(text[start - 1]) and _WORD.match(text[start])
    cut_end = end < len(text) and _WORD.match(text[end - 1]) and _WORD.match(text[end])
    if cut_start or cut_end or text[start:end] != text[start:end].strip():
      word = text[max(0, text.rfind(" ", 0, start) + 1):(text.find(" ", end) + 1 or len(text) + 1) - 1]
      raise DataError(f"{where}: field '{field}' is [{start}, {end}) = {text[start:end]!r}, which does not match a "
                      f"word boundary (in {word!r}); expected offsets where words start and end")
    out.append({"type": s["type"].strip(), "start": start, "end": end})
  return out


def read_bio(path: Path, domain: str) -> list[dict]:
  """CrossNER's reader: sentences as text joined by spaces, entities as spans of set "entities"."""
  return [{"text": s["text"], "attributes": {ENTITIES: sorted({e["type"] for e in s["spans"]})},
           "spans": s["spans"], "domain": domain} for s in crossner.read_conll(path)]


def read_descriptions(path: Path, names: dict) -> dict:
  """attributes.json: {set: {name: description}}, each set and name one the data uses."""
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected {{set: {{name: description}}}}") from None
  if not isinstance(data, dict):
    raise DataError(f"{path}: a JSON {type(data).__name__}; expected {{set: {{name: description}}}}")
  for set_name, described in data.items():
    if set_name not in names:
      raise DataError(f"{path}: set {set_name!r} is in no data file; {close_matches(set_name, names)}")
    if not isinstance(described, dict):
      raise DataError(f"{path}: field {set_name!r} is {described!r}; expected {{name: description}}")
    for name, text in described.items():
      if name not in names[set_name]:
        raise DataError(f"{path}: attribute {set_name}/{name} is in no data file; {close_matches(name, names[set_name])}")
      if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}: field '{set_name}.{name}' is {text!r}; expected a non-empty description")
  return data


def close_matches(name: str, valid) -> str:
  close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
  return f"close matches: {', '.join(close)}" if close else f"valid: {', '.join(list(valid)[:20]) or 'none'}"


def warn_unseen(path: Path, files: dict, records: dict) -> None:
  """A dev/test label never seen in train has an untrained prompt and no seed: say so, with counts."""
  trained = {(s, n) for r in records["train"] for s, names in r["attributes"].items() for n in names}
  for split in ("dev", "test"):
    counts = collections.Counter((s, n) for r in records.get(split, ()) for s, names in r["attributes"].items()
                                 for n in names if (s, n) not in trained)
    if counts:
      shown = ", ".join(f"{s}/{n} ({k} rows)" for (s, n), k in counts.most_common(5))
      print(f"warning: {path / files[split]}: {len(counts)} labels never seen in train: {shown}"
            f"{', ...' if len(counts) > 5 else ''}", flush=True)


def to_example(record: dict, uid: str, domain: str) -> Example:
  """Attributes as given; values and typed values: the span strings (entity data), in order."""
  del domain  # each record names its own
  spans, typed_values = gold_spans(record["text"], sources.rows(record["spans"]), uid)
  return Example(uid=uid, domain=record["domain"], text=record["text"],
                 attributes={s: tuple(names) for s, names in json.loads(record["attributes"]).items()},
                 values=unique_in_order(v for _, v in typed_values), typed_values=typed_values, spans=spans)


def fingerprint(data_path: str) -> str:
  """A hash of the folder's data files' contents: what a cached result made from them depends on."""
  path = Path(data_path).expanduser()
  names = sorted(split_files(path).values()) + ([DESCRIPTIONS] if (path / DESCRIPTIONS).is_file() else [])
  return hashlib.sha256("".join(f"{n}:{sources.file_sha256(path / n)};" for n in names).encode()).hexdigest()[:16]


def folder_key(path: Path) -> str:
  """Where a folder's prepared copy lives: its name (readable) and a hash of its absolute path (unique)."""
  path = Path(path).resolve()
  slug = re.sub(r"[^A-Za-z0-9]+", "_", path.name).strip("_")[:40] or "data"
  return f"{slug}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def prepared(data_path: str, data_dir: str | None = None):
  """The folder as a prepared TFDS builder, (re)built when absent or when a raw file changed. Every line
  is checked first, so a bad file fails before anything is written."""
  folder = read_folder(data_path)
  root = os.path.expanduser(data_dir) if data_dir else tfds.core.constants.DATA_DIR
  where = os.path.join(root, "user_files", folder_key(folder.path))
  return sources.prepare(lambda: UserFiles(data_path=str(folder.path), data_dir=where, file_format="array_record"),
                         f"files {folder.path}")


class UserFiles(RawFilesBuilder):
  """A data folder as TFDS: splits train and, where their files exist, dev and test."""
  name = "user_files"
  VERSION = tfds.core.Version("1.0.0")
  FOLDER = ""
  SOURCE = "the folder --config.data_path names"

  def __init__(self, *, data_path: str, **kwargs):
    self.folder = Path(data_path)  # not `data_path`: tfds builders have that property
    super().__init__(**kwargs)

  def _info(self):
    return LocalDatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "attributes": tfds.features.Text(),  # JSON {set: [names]}: the sets differ from folder to folder
            "spans": tfds.features.Sequence({
                "type": tfds.features.Text(),
                "start": tfds.features.Scalar(np.int32), "end": tfds.features.Scalar(np.int32),
            }),
            "domain": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def required_files(self) -> list[str]:
    files = list(split_files(self.folder).values())
    return files + ([DESCRIPTIONS] if (self.folder / DESCRIPTIONS).is_file() else [])

  def download_files(self, dl_manager):
    raise DataError(f"{self.folder}: a files dataset is read from its folder, never downloaded")

  def raw_files(self, dl_manager) -> dict[str, Path]:
    self._raw_record = {"root": str(self.folder), "files": self.checked_files(self.folder)}
    return {f: self.folder / f for f in self.required_files()}

  def stale_reason(self) -> str | None:
    path = Path(self.data_dir) / sources.RAW_RECORD
    record = json.loads(path.read_text()) if path.is_file() else None
    known = record["files"] if record else None
    files = self.checked_files(self.folder, known)
    self._raw_record = {"root": str(self.folder), "files": files}
    if record is None:
      return "it records no raw files"
    changed = sorted(f for f in set(files) | set(known) if files.get(f, {}).get("sha256") != known.get(f, {}).get("sha256"))
    return f"{self.folder / changed[0]} changed, was added or removed since it was prepared" if changed else None

  def _split_generators(self, dl_manager):
    self.raw_files(dl_manager)
    folder = read_folder(str(self.folder))
    self.info.metadata["attributes"] = {s: {n: {"description": d, "general": False} for n, d in names.items()}
                                        for s, names in folder.attributes.items()}
    self.info.metadata["domains"] = list(folder.domains)
    return {split: self._generate_examples(rows) for split, rows in folder.records.items()}

  def _generate_examples(self, rows):
    for i, r in enumerate(rows):
      yield i, {"text": r["text"], "attributes": json.dumps(r["attributes"], ensure_ascii=False),
                "spans": r["spans"], "domain": r["domain"]}
