"""Where the raw files come from, and reading prepared TFDS datasets back without TensorFlow.

Offline (the default) a builder reads `<root>/<dataset folder>/...`, where root is the TFDS
`manual_dir` or `$MSP_DATA_DIR` (the layout of `../shared/data`). Online (`download=True`) it fetches
the public files itself. Prepared datasets are array_record files read with `as_data_source()`:
tfds' default tfrecord format would need TensorFlow.
"""
from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Sequence

import tensorflow_datasets as tfds

from msp_jax.errors import MspError

DATA_DIR_ENV = "MSP_DATA_DIR"


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
  ~/tensorflow_datasets)."""
  names = [c.name for c in builder_cls.BUILDER_CONFIGS]
  if domain not in names:
    raise DataError(f"{builder_cls.name}: unknown domain {domain!r}; valid: {', '.join(names)}")
  builder = builder_cls(config=domain, data_dir=os.path.expanduser(data_dir) if data_dir else None,
                        file_format="array_record", download=download)
  builder.download_and_prepare()
  return builder


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


class RawFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose raw files are local (manual_dir / $MSP_DATA_DIR) or, if asked, downloaded.

  Subclasses set FOLDER (the folder name under the data root), SOURCE (where the files are published)
  and define `required_files()` (paths under FOLDER) and `download_files(dl_manager)`.
  """
  FOLDER: str
  SOURCE: str

  def __init__(self, *, download: bool = False, **kwargs):
    self._allow_download = download
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
      return {f: base / f for f in required}
    if not self._allow_download:
      raise missing_data_error(self.FOLDER, required, self.SOURCE)
    return {f: Path(p) for f, p in self.download_files(dl_manager).items()}


def rows(sequence) -> list[dict]:
  """A TFDS Sequence-of-dict feature as read back (a dict of lists) -> a list of dicts."""
  if isinstance(sequence, dict):
    return [dict(zip(sequence, values)) for values in zip(*sequence.values())]
  return list(sequence)
