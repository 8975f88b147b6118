"""The prepared TFDS copy never hides the raw files: a changed raw file rebuilds it, a missing or corrupt
one is a one-line error. Each test works on a temporary copy of one raw dataset folder."""
import json
import os
import shutil

import pytest

from msp_jax.data import crossner, sources, topv2
from msp_jax.data.sources import DataError


def copy_raw(raw_data_dir, tmp_path, monkeypatch, folder, files):
  root = tmp_path / "raw"
  for f in files:
    (root / folder / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(raw_data_dir / folder / f, root / folder / f)
  monkeypatch.setenv("MSP_DATA_DIR", str(root))
  return root / folder


@pytest.fixture
def crossner_copy(raw_data_dir, tmp_path, monkeypatch):
  files = [crossner.split_file("music", s) for s in crossner.SPLITS]
  return copy_raw(raw_data_dir, tmp_path, monkeypatch, "crossner", files), str(tmp_path / "tfds")


def prepare_crossner(data_dir):
  return sources.prepared(crossner.Crossner, "music", data_dir=data_dir)


def test_preparing_records_the_raw_files_and_a_touch_does_not_rebuild(crossner_copy, capsys):
  raw, data_dir = crossner_copy
  builder = prepare_crossner(data_dir)
  record = json.load(open(os.path.join(builder.data_dir, sources.RAW_RECORD)))
  test_file = raw / crossner.split_file("music", "test")
  assert record["root"] == str(raw)
  assert record["files"][crossner.split_file("music", "test")]["size"] == test_file.stat().st_size
  os.utime(test_file, ns=(1, 1))  # same bytes, new mtime: the hash decides, nothing to rebuild
  capsys.readouterr()
  prepare_crossner(data_dir)
  assert "rebuilding" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_a_missing_or_corrupt_raw_file_is_refused_even_when_prepared(damage, crossner_copy):
  raw, data_dir = crossner_copy
  prepare_crossner(data_dir)
  path = raw / crossner.split_file("music", "dev")
  if damage == "missing":
    path.unlink()
  else:
    path.write_text(path.read_text().replace("O\n", "B-misc\n", 1))
  with pytest.raises(DataError) as e:
    prepare_crossner(data_dir)
  message = str(e.value)
  assert "\n" not in message and "dev.txt" in message
  assert ("missing" in message) if damage == "missing" else ("checksums.tsv" in message)


def test_a_changed_raw_file_without_published_checksum_rebuilds(raw_data_dir, tmp_path, monkeypatch, capsys):
  """TOPv2's release has no per-file checksums: a changed file is taken as the new truth and rebuilt."""
  files = sorted({f for d in topv2.DOMAINS for f in topv2.Topv2(config=d, data_dir=str(tmp_path / "t")).required_files()})
  raw = copy_raw(raw_data_dir, tmp_path, monkeypatch, "topv2", files)
  data_dir = str(tmp_path / "tfds")
  first = sources.read_split(sources.prepared(topv2.Topv2, "weather", data_dir=data_dir), "test")
  path = raw / topv2.split_file("weather", "test")
  lines = path.read_text().splitlines(keepends=True)
  original = first[0]["utterance"]
  changed = original.replace("rain", "snow")
  assert changed != original
  lines[1] = lines[1].replace("rain", "snow")  # line 0 is the header; the parse changes with the utterance
  path.write_text("".join(lines))
  capsys.readouterr()
  builder = sources.prepared(topv2.Topv2, "weather", data_dir=data_dir)
  out = capsys.readouterr().out
  (line,) = [line for line in out.splitlines() if "rebuilding" in line]  # one line, naming the file
  assert "weather_test.tsv differs" in line
  assert sources.read_split(builder, "test")[0]["utterance"] == changed
