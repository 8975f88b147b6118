"""A user's own folder as a task (dataset=files): JSONL and BIO files read into the same Examples as the
benchmarks, through TFDS; each bad file is a one-line error naming file, line and field, with nothing
written; labels only dev/test have are a warning with counts."""
import json

import pytest

from configs import common
from msp_jax import assembly, trainer
from msp_jax.data import load_task, user_files
from msp_jax.data.sources import DataError
from msp_jax.data.spans import bio_tags


def write(folder, name, lines):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / name).write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                                     for line in lines), encoding="utf-8")


ROWS = [
    {"text": "cancel my order and refund me", "attributes": {"intents": ["cancel_order", "refund"], "urgency": ["urgent"]}},
    {"text": "where is my parcel", "intents": ["order_status"]},  # the plain form
    {"text": "thanks, that's all"},  # no attribute
    {"text": "Wo ist mein Paket? Ich warte seit Montag", "attributes": {"intents": ["order_status"]}},
    {"text": "send it to Zürich instead", "attributes": {"intents": ["change_address"]},
     "spans": [{"type": "city", "start": 11, "end": 17}]},
]
BIO = ["Ada\tB-person", "Lovelace\tI-person", "wrote\tO", "in\tO", "London\tB-location", "", "Hello\tO", ""]


@pytest.fixture
def folder(tmp_path):
  path = tmp_path / "my_support-desk"
  write(path, "train.jsonl", ROWS)
  write(path, "test.txt", BIO)
  write(path, "attributes.json", ['{"intents": {"order_status": "where is my order"}}'])
  return path


def test_jsonl_and_bio_files_become_examples(folder, tmp_path):
  task = load_task("files", "", "few_shot", data_path=str(folder), data_dir=str(tmp_path / "tfds"), seed=0)
  assert task.ontology.set_names == ("entities", "intents", "urgency")
  assert task.ontology["intents"].names == ("cancel_order", "change_address", "order_status", "refund")
  assert task.ontology["entities"].names == ("city", "location", "person")  # a span type no set lists: entities
  described = dict(zip(task.ontology["intents"].names, task.ontology["intents"].descriptions))
  assert described["order_status"] == "where is my order" and described["cancel_order"] == "cancel order"
  assert len(task.splits["dev"]) == 1 and len(task.splits["train"]) == 4  # 10% of 5 rows, at least one
  by_text = {ex.text: ex for ex in task.splits["train"] + task.splits["dev"]}
  assert set(by_text) == {r["text"] for r in ROWS}
  assert by_text[ROWS[0]["text"]].attributes == {"entities": (), "intents": ("cancel_order", "refund"), "urgency": ("urgent",)}
  assert by_text[ROWS[2]["text"]].attributes == {"entities": (), "intents": (), "urgency": ()}
  zurich = by_text["send it to Zürich instead"]
  assert zurich.typed_values == (("city", "Zürich"),) and zurich.attributes["entities"] == ("city",)
  assert {ex.domain for ex in by_text.values()} == {"my support desk"}
  first, second = task.splits["test"]
  assert first.text == "Ada Lovelace wrote in London" and second.attributes["entities"] == ()
  assert bio_tags(first.text, first.spans) == ["B-person", "I-person", "O", "O", "B-location"]


def test_the_dev_share_is_seeded_and_a_changed_file_rebuilds(folder, tmp_path, capsys):
  data_dir = str(tmp_path / "tfds")
  dev = lambda seed: [ex.text for ex in load_task("files", "", "full", data_path=str(folder), data_dir=data_dir, seed=seed).splits["dev"]]
  assert len({tuple(dev(seed)) for seed in range(6)}) > 1
  capsys.readouterr()
  write(folder, "train.jsonl", ROWS + [{"text": "one more", "intents": ["refund"]}])
  task = load_task("files", "", "full", data_path=str(folder), data_dir=data_dir)
  assert "train.jsonl changed" in capsys.readouterr().out and len(task.splits["train"]) + len(task.splits["dev"]) == 6


def test_a_label_only_dev_has_is_a_warning_with_counts(folder, capsys):
  write(folder, "dev.jsonl", [{"text": "I want a human", "intents": ["speak_to_human"]},
                              {"text": "a person please", "intents": ["speak_to_human", "refund"]}])
  user_files.read_folder(str(folder))
  out = capsys.readouterr().out
  assert out.count("\n") == 2  # dev and test (the BIO file's entity types) each one line
  assert "dev.jsonl: 1 labels never seen in train: intents/speak_to_human (2 rows)" in out


BAD = {  # case: (file, its lines, expected in the message)
    "invalid_json": ("train.jsonl", [ROWS[0], '{"text": "half a line",'], "train.jsonl:2: not valid JSON"),
    "missing_text": ("train.jsonl", [ROWS[0], ROWS[1], {"intents": ["refund"]}], "train.jsonl:3: field 'text' is missing"),
    "attributes_not_a_list": ("train.jsonl", [ROWS[0], {"text": "hi", "attributes": {"intents": "refund"}}],
                              "train.jsonl:2: field 'attributes.intents' is 'refund'; expected a list of attribute names"),
    "span_outside_text": ("train.jsonl", [{"text": "to Paris", "intents": ["go"], "spans": [{"type": "city", "start": 3, "end": 12}]}],
                          "train.jsonl:1: field 'spans[0]' is [3, 12), outside the text (length 8)"),
    "span_cuts_a_word": ("train.jsonl", [ROWS[0], {"text": "to Paris", "intents": ["go"], "spans": [{"type": "city", "start": 3, "end": 6}]}],
                         "train.jsonl:2: field 'spans[0]' is [3, 6) = 'Par', which does not match a word boundary"),
    "empty_split": ("dev.jsonl", ["", "  "], "dev.jsonl: no examples"),
    "bad_bio_tag": ("test.txt", ["Ada\tB-person", "Lovelace\tX-person"], "test.txt:2: field 'tag' is 'X-person'"),
    "unknown_described_attribute": ("attributes.json", ['{"intents": {"refnd": "money back"}}'],
                                    "attributes.json: attribute intents/refnd is in no data file; close matches: refund"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_file_is_one_line_and_nothing_is_written(case, folder, tmp_path):
  name, lines, expected = BAD[case]
  write(folder, name, lines)
  workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
  c = common.get_config("smoke")
  c.update(dataset="files", data_path=str(folder), data_dir=str(data_dir), workdir=str(workdir), model="/nonexistent")
  with pytest.raises(DataError) as e:
    trainer.train(c)  # the files are checked before the backbone loads or the workdir exists
  message = str(e.value)
  assert "\n" not in message and str(folder / name) in message and expected in message, message
  assert not workdir.exists() and not data_dir.exists()


def test_data_path_needs_the_files_dataset(tmp_path):
  c = common.get_config("smoke")
  c.update(data_path=str(tmp_path))
  with pytest.raises(assembly.ConfigError, match="config.data_path=.*is read with --config.dataset=files only"):
    assembly.validate(c)
  c.update(dataset="files", data_path=str(tmp_path / "nowhere"))
  with pytest.raises(DataError, match="no such folder; expected a folder with train.jsonl"):
    assembly.validate(c)
