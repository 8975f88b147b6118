"""Where the raw files come from, and reading prepared TFDS datasets back without TensorFlow.

Offline (the default) a builder reads `<root>/<dataset folder>/...`, where root is the TFDS
`manual_dir` or `$MSP_DATA_DIR` (the layout of `../shared/data`). Online (`download=True`) it fetches
the public files itself. Prepared datasets are array_record files read with `as_data_source()`:
tfds' default tfrecord format would need TensorFlow.

Local raw files are checked against checksums.tsv when a dataset is prepared, and the prepared folder
records which files it was built from (`msp_raw_files.json`: root, size, mtime, sha256). Each later load
compares the raw files present now with that record (size and mtime first, the hash only when those
differ): a changed file rebuilds the dataset, a missing or corrupt one is a one-line error, so the
TFDS cache never hides what is under $MSP_DATA_DIR.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import tensorflow_datasets as tfds

from msp_jax import files
from msp_jax.errors import MspError

DATA_DIR_ENV = "MSP_DATA_DIR"
RAW_RECORD = "msp_raw_files.json"  # in the prepared dataset's folder, beside tfds' dataset_info.json


class DataError(MspError, ValueError):
  """A missing data folder, a malformed raw file, or an unknown dataset/domain/setting name."""


def manual_dir_of(dl_manager) -> str | None:
  """The TFDS manual_dir if it exists (tfds raises instead of returning None)."""
  path = getattr(dl_manager, "_manual_dir", None)
  return str(path) if path and os.path.isdir(path) else None


def find_local(folder: str, required: Sequence[str], manual_dir: str | None = None) -> Path | None:
  """`<root>/<folder>` holding every `required` file, for root = manual_dir, then $MSP_DATA_DIR.

  Returns None when neither root has the folder; raises when a folder exists but misses files,
  since that is a broken copy, not an absent one.
  """
  for root in (manual_dir, os.environ.get(DATA_DIR_ENV)):
    if not root or not (Path(root) / folder).is_dir():
      continue
    base = Path(root) / folder
    missing = [f for f in required if not (base / f).is_file()]
    if missing:
      raise DataError(f"{base}: {len(missing)} of the raw files are missing, e.g. {missing[:3]}; "
                      f"expected all of: {_summary(required)}")
    return base
  return None


def missing_data_error(folder: str, required: Sequence[str], source: str) -> DataError:
  """The one-line error for absent raw files: which files go where, or how to download them."""
  env = os.environ.get(DATA_DIR_ENV)
  where = f"${DATA_DIR_ENV}={env}" if env else f"${DATA_DIR_ENV} (unset)"
  return DataError(f"raw files not found: put {_summary(required)} under <root>/{folder}/, where <root> is "
                   f"{where} or the TFDS manual_dir; or pass download=True (--download) to fetch them "
                   f"from {source}")


def _summary(files: Sequence[str]) -> str:
  return ", ".join(files) if len(files) <= 4 else f"{', '.join(files[:3])}, ... ({len(files)} files)"


def prepared(builder_cls, domain: str, *, data_dir: str | None = None, download: bool = False):
  """The builder for one config, prepared once into data_dir (default: tfds', $TFDS_DATA_DIR or
  ~/tensorflow_datasets), and prepared again when its raw files changed since."""
  names = [c.name for c in builder_cls.BUILDER_CONFIGS]
  if domain not in names:
    raise DataError(f"{builder_cls.name}: unknown domain {domain!r}; valid: {', '.join(names)}")
  return prepare(lambda: builder_cls(config=domain, data_dir=os.path.expanduser(data_dir) if data_dir else None,
                                     file_format="array_record", download=download), f"{builder_cls.name}/{domain}")


def prepare(make, label: str):
  """`make()`'s builder, prepared, and prepared afresh when its raw files changed since."""
  builder = make()
  if builder.is_prepared():
    why = builder.stale_reason()
    if why:
      print(f"{label}: {why}; rebuilding {builder.data_dir}", flush=True)
      shutil.rmtree(builder.data_dir)
      builder = make()
  builder.download_and_prepare()
  builder.write_raw_record()
  return builder


def file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def read_split(builder, split: str) -> list[dict]:
  """All records of a prepared split as plain Python (text as str), in file order."""
  source = builder.as_data_source(split=split)
  return [_to_python(r) for r in source.__getitems__(list(range(len(source))))] if len(source) else []


def _to_python(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  if hasattr(value, "tolist"):
    return _to_python(value.tolist())
  return value


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """tfds' DatasetInfo without its GCS lookup. Our datasets are never on tfds' bucket, and tfds 4.9.10
  makes a /tmp folder for that lookup each time a builder is made before its data is prepared, and
  never removes it."""

  def initialize_from_bucket(self) -> None:
    pass


class RawFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose raw files are local (manual_dir / $MSP_DATA_DIR) or, if asked, downloaded.

  Subclasses set FOLDER (the folder name under the data root), SOURCE (where the files are published)
  and define `required_files()` (paths under FOLDER) and `download_files(dl_manager)`.
  """
  FOLDER: str
  SOURCE: str
  FILE_URL = ""  # where each raw file is published as FILE_URL + path (its checksums.tsv key); "" for an archive

  def __init__(self, *, download: bool = False, **kwargs):
    self._allow_download = download
    self._raw_record = None  # the raw files this builder read or checked, for RAW_RECORD
    super().__init__(**kwargs)

  @abc.abstractmethod
  def required_files(self) -> list[str]:
    """The raw files' paths under FOLDER."""

  @abc.abstractmethod
  def download_files(self, dl_manager) -> dict[str, Path]:
    """Fetches the raw files from SOURCE: path under FOLDER -> downloaded file."""

  def raw_files(self, dl_manager) -> dict[str, Path]:
    """Each required path under FOLDER -> the file to read."""
    required = self.required_files()
    base = find_local(self.FOLDER, required, manual_dir_of(dl_manager))
    if base is not None:
      self._raw_record = {"root": str(base), "files": self.checked_files(base)}
      return {f: base / f for f in required}
    if not self._allow_download:
      raise missing_data_error(self.FOLDER, required, self.SOURCE)
    self._raw_record = {"downloaded": self.SOURCE}  # tfds checks downloads against checksums.tsv itself
    return {f: Path(p) for f, p in self.download_files(dl_manager).items()}

  def checked_files(self, base: Path, known: dict | None = None) -> dict[str, dict]:
    """{path: {size, mtime_ns, sha256}} of the local raw files, each checked against checksums.tsv where
    it records the file; a `known` entry with the same size and mtime is trusted without hashing."""
    state = {}
    for f in self.required_files():
      path = base / f
      stat = path.stat()
      old = (known or {}).get(f)
      if old and (old["size"], old["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
        state[f] = old
        continue
      digest = file_sha256(path)
      info = self.url_infos.get(self.FILE_URL + f) if self.FILE_URL else None
      if info is not None and (int(info.size), info.checksum) != (stat.st_size, digest):
        raise DataError(f"{path}: size {stat.st_size}, sha256 {digest[:16]}... but checksums.tsv records size "
                        f"{info.size}, sha256 {info.checksum[:16]}... for {self.FILE_URL + f}; restore the published file")
      state[f] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return state

  def stale_reason(self) -> str | None:
    """Why the prepared dataset no longer matches its raw files, or None if it does. Raises DataError
    (one line naming the file) when a raw file is missing or fails its checksum."""
    path = Path(self.data_dir) / RAW_RECORD
    record = json.loads(path.read_text()) if path.is_file() else None
    if record and "downloaded" in record:
      return None
    required = self.required_files()
    manual = os.path.join(self.data_dir_root, "downloads", "manual")  # tfds' default manual_dir
    base = find_local(self.FOLDER, required, manual if os.path.isdir(manual) else None)
    if base is None and record and record.get("root") and not os.environ.get(DATA_DIR_ENV):
      # No data root given this time: check the files the copy was prepared from, where they were.
      recorded = Path(record["root"])
      base = recorded if all((recorded / f).is_file() for f in required) else None
    if base is None:
      if self._allow_download and record is None:
        return None  # nothing local to compare with; the download path is tfds' business
      raise DataError(f"{self.data_dir} was prepared from raw files that are gone: "
                      f"{missing_data_error(self.FOLDER, required, self.SOURCE)}")
    known = record["files"] if record and record.get("root") == str(base) else None
    files = self.checked_files(base, known)
    self._raw_record = {"root": str(base), "files": files}
    if record is None:
      return "it records no raw files (prepared before they were recorded)"
    changed = [f for f in required if files[f]["sha256"] != record["files"].get(f, {}).get("sha256")]
    if changed:
      return f"raw file {base / changed[0]} differs from the one it was prepared from ({len(changed)} changed)"
    return None

  def write_raw_record(self) -> None:
    """Records the raw files checked or read (after preparing, or refreshed after a check)."""
    if self._raw_record is None:
      return
    files.write_json_atomic(str(Path(self.data_dir) / RAW_RECORD), self._raw_record, sort_keys=True)


def rows(sequence) -> list[dict]:
  """A TFDS Sequence-of-dict feature as read back (a dict of lists) -> a list of dicts."""
  if isinstance(sequence, dict):
    return [dict(zip(sequence, values)) for values in zip(*sequence.values())]
  return list(sequence)
