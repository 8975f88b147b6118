"""The TFDS builders, prepared from ../shared/data into a session tmp dir (array_record, no TensorFlow)."""
import hashlib
import tempfile

import pytest

from msp_jax.data import crossner, nlupp, sources, topv2
from msp_jax.data.ontology import Ontology
from msp_jax.data.sources import DataError


@pytest.fixture(scope="session")
def prepared(raw_data_dir, tfds_dir):
  return lambda cls, domain: sources.prepared(cls, domain, data_dir=tfds_dir)


def split_sizes(builder) -> dict[str, int]:
  return {name: info.num_examples for name, info in builder.info.splits.items()}


@pytest.mark.parametrize("domain, total, without_intents", [("banking", 2071, 88), ("hotels", 1009, 274)])
def test_nlupp(prepared, domain, total, without_intents):
  builder = prepared(nlupp.Nlupp, domain)
  sizes = split_sizes(builder)
  assert sorted(sizes) == sorted(f"fold{f}" for f in range(20)) and sum(sizes.values()) == total
  records = [r for f in range(20) for r in sources.read_split(builder, f"fold{f}")]
  assert sum(len(r["intents"]) == 0 for r in records) == without_intents
  assert {r["fold"] for r in sources.read_split(builder, "fold7")} == {7}
  ontology = Ontology.from_metadata("nlupp", builder.info.metadata, nlupp.DOMAINS)
  assert len(ontology["intents"]) == {"banking": 48, "hotels": 40}[domain]


def test_nlupp_record_round_trip(prepared):
  first = sources.read_split(prepared(nlupp.Nlupp, "hotels"), "fold0")[0]
  assert first["text"] == "we will arrive tomorrow at 25 to 7 p.m." and first["intents"] == []
  assert first["slots"]["name"] == ["date_from", "time_from"] and first["slots"]["start"] == [15, 27]


@pytest.mark.parametrize("domain, counts", [("music", (100, 380, 465)), ("politics", (200, 541, 651))])
def test_crossner(prepared, domain, counts):
  builder = prepared(crossner.Crossner, domain)
  assert split_sizes(builder) == dict(zip(crossner.SPLITS, counts))
  ontology = Ontology.from_metadata("crossner", builder.info.metadata, crossner.DOMAINS)
  general = {a.name for a in ontology["entities"].attributes if a.general}
  assert general == {"location", "misc", "organisation", "person"}
  assert len(ontology["entities"]) == {"music": 13, "politics": 9}[domain]


def test_crossner_sentence_final_entity_survives_preparation(prepared):
  records = sources.read_split(prepared(crossner.Crossner, "music"), "train")
  final = [r for r in records if r["tags"][-1] != "O"]
  for r in final:
    entities = sources.rows(r["entities"])
    assert entities[-1]["end"] == len(r["tokens"])


@pytest.mark.parametrize("domain, counts", [("reminder", (17840, 2526, 5767)), ("weather", (23054, 2667, 5682))])
def test_topv2(prepared, domain, counts):
  builder = prepared(topv2.Topv2, domain)
  sizes = split_sizes(builder)
  assert (sizes["train"], sizes["eval"], sizes["test"]) == counts
  assert (sizes["train_25spis"], sizes["valid_25spis"]) == {"reminder": (493, 337), "weather": (176, 147)}[domain]
  assert len(builder.as_data_source(split="test")) == counts[2]
  ontology = Ontology.from_metadata("topv2", builder.info.metadata, topv2.DOMAINS)
  assert ontology.set_names == ("intents", "slots")
  assert (len(ontology["intents"]), len(ontology["slots"])) == {"reminder": (19, 32), "weather": (7, 11)}[domain]


def test_missing_raw_files_fail_with_instructions(tmp_path, monkeypatch):
  monkeypatch.setenv("MSP_DATA_DIR", str(tmp_path / "nowhere"))
  with pytest.raises(DataError, match=r"raw files not found: put data/hotels/fold0.json.* under <root>/nlupp/"):
    sources.prepared(nlupp.Nlupp, "hotels", data_dir=str(tmp_path / "tfds"))


def test_unknown_domain_lists_valid_ones(tmp_path):
  with pytest.raises(DataError, match="unknown domain 'jazz'; valid: ai, conll2003, literature, music"):
    sources.prepared(crossner.Crossner, "jazz", data_dir=str(tmp_path))


class RecordingDownloads:
  """Stands in for tfds' DownloadManager: records the URLs, serves the local copies."""

  def __init__(self, local):
    self.local, self.urls, self._manual_dir = local, {}, None

  def download(self, urls):
    self.urls.update(urls)
    return {path: self.local / path for path in urls}


def test_download_fetches_the_pinned_public_files(raw_data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("MSP_DATA_DIR", str(tmp_path / "nowhere"))
  builder = nlupp.Nlupp(config="hotels", data_dir=str(tmp_path), file_format="array_record", download=True)
  downloads = RecordingDownloads(raw_data_dir / "nlupp")
  files = builder.raw_files(downloads)
  assert len(files) == 21 and files["data/hotels/fold3.json"] == raw_data_dir / "nlupp/data/hotels/fold3.json"
  assert downloads.urls["data/hotels/fold3.json"] == (
      "https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/57ec275d8078/nlupp/data/hotels/fold3.json")


def test_recorded_checksums_match_the_local_copies(raw_data_dir):
  infos = nlupp.Nlupp.url_infos
  assert infos == crossner.Crossner.url_infos  # one checksums.tsv beside both builders
  assert len(infos) == 41 + 18
  for url, info in infos.items():
    folder = "nlupp" if "PolyAI" in url else "crossner"
    relative = url.split("/nlupp/", 1)[1] if folder == "nlupp" else url.split("/2e7ba2a7798c/", 1)[1]
    data = (raw_data_dir / folder / relative).read_bytes()
    assert (int(info.size), info.checksum) == (len(data), hashlib.sha256(data).hexdigest()), url


def test_preparing_leaves_nothing_in_the_temp_folder(raw_data_dir, tmp_path, monkeypatch):
  # tfds' own DatasetInfo makes a /tmp folder for a GCS lookup whenever a builder is made before its
  # data is prepared, and never removes it.
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  sources.prepared(nlupp.Nlupp, "hotels", data_dir=str(tmp_path / "tfds"))
  for builder, config in ((crossner.Crossner, "music"), (topv2.Topv2, "weather")):  # made unprepared: each builder
    builder(config=config, data_dir=str(tmp_path / "tfds"), file_format="array_record")
  assert list(scratch.iterdir()) == []
