"""Raw-file parsers against the real files and hand-written snippets (no TFDS here)."""
import csv
import json
import re

import pytest

from msp_jax.data import crossner, nlupp, topv2
from msp_jax.data.sources import DataError, find_local, missing_data_error

# From ../shared/data/README.md (counted there with stdlib one-liners).
CROSSNER_SENTENCES = {"politics": (200, 541, 651), "science": (200, 450, 543), "music": (100, 380, 465),
                      "literature": (100, 400, 416), "ai": (100, 350, 431)}
TOPV2_ROWS = {"reminder": (17840, 2526, 5767), "weather": (23054, 2667, 5682)}


# --- NLU++ -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("domain, total, without_intents", [("banking", 2071, 88), ("hotels", 1009, 274)])
def test_nlupp_counts_and_examples_without_intents_are_kept(raw_data_dir, domain, total, without_intents):
  records = [r for f in range(20) for r in nlupp.read_fold(raw_data_dir / "nlupp" / nlupp.fold_file(domain, f), f)]
  assert len(records) == total
  assert sum(not r["intents"] for r in records) == without_intents


def test_nlupp_first_hotel_examples_as_in_the_readme(raw_data_dir):
  first, second, third = nlupp.read_fold(raw_data_dir / "nlupp/data/hotels/fold0.json", 0)[:3]
  assert first["text"] == "we will arrive tomorrow at 25 to 7 p.m." and first["intents"] == []
  assert [(s["name"], s["text"], s["start"], s["end"]) for s in first["slots"]] == [
      ("date_from", "tomorrow", 15, 23), ("time_from", "25 to 7 p.m.", 27, 39)]
  assert json.loads(first["slots"][1]["value"]) == {"hour": 18, "minute": 35}
  assert second["intents"] == ["why", "spa", "wrong_notworking_notshowing"] and second["slots"] == []
  assert third["intents"] == ["how", "cancel_close_leave_freeze", "restaurant", "booking"]
  example = nlupp.to_example(first, "hotels/fold0/0", "hotels")
  assert example.attributes == {"intents": ()} and example.values == ("date from", "time from")


def test_nlupp_ontology_counts_from_the_readme(raw_data_dir):
  for domain, total in (("banking", 48), ("hotels", 40)):
    intents = nlupp.intent_attributes(raw_data_dir / "nlupp" / nlupp.ONTOLOGY_FILE, domain)
    assert len(intents) == total and sum(a["general"] for a in intents.values()) == 25
    assert not intents["refund"]["general"]
  assert nlupp.intent_attributes(raw_data_dir / "nlupp" / nlupp.ONTOLOGY_FILE, "hotels")["affirm"] == {
      "description": "is the intent to affirm something?", "general": True}


def test_nlupp_bad_record_names_file_record_and_field(tmp_path):
  path = tmp_path / "fold0.json"
  path.write_text(json.dumps([{"text": "ok"}, {"text": "hi", "intents": "greet"}]))
  with pytest.raises(DataError, match=r"fold0.json: example 1: field 'intents' is 'greet'"):
    nlupp.read_fold(path, 0)
  path.write_text('[{"text": "ok"},\n{"text": }]')
  with pytest.raises(DataError, match=r"fold0.json:2: not valid JSON"):
    nlupp.read_fold(path, 0)


# --- CrossNER --------------------------------------------------------------------------------------

@pytest.mark.parametrize("domain", sorted(CROSSNER_SENTENCES))
def test_crossner_sentence_counts(raw_data_dir, domain):
  counts = tuple(len(list(crossner.read_conll(raw_data_dir / "crossner" / crossner.split_file(domain, s))))
                 for s in crossner.SPLITS)
  assert counts == CROSSNER_SENTENCES[domain]


def test_crossner_sentence_final_entity_is_closed_at_the_sentence_break(tmp_path):
  path = tmp_path / "train.txt"
  path.write_text("He\tO\nlikes\tO\nLinkin\tB-band\nPark\tI-band\n\nThe\tO\nBeatles\tB-band\nplayed\tO\n")
  first, second = crossner.read_conll(path)
  assert first["entities"] == [{"type": "band", "text": "Linkin Park", "start": 2, "end": 4}]
  assert second["entities"] == [{"type": "band", "text": "Beatles", "start": 1, "end": 2}]


def test_crossner_real_sentence_final_entities(raw_data_dir):
  """README: 2 music sentences end inside an entity; each keeps that entity, ending at its last token."""
  ending = []
  for split in crossner.SPLITS:
    for sentence in crossner.read_conll(raw_data_dir / "crossner" / crossner.split_file("music", split)):
      if sentence["tags"][-1] != "O":
        ending.append(sentence)
  assert len(ending) == 2
  for sentence in ending:
    last = sentence["entities"][-1]
    assert last["end"] == len(sentence["tokens"]) and last["type"] == sentence["tags"][-1][2:]


def test_crossner_bio_spans_by_hand():
  tokens = ["a", "b", "c", "d", "e", "f"]
  tags = ["B-person", "I-person", "I-location", "O", "I-misc", "B-misc"]
  assert [(e["type"], e["start"], e["end"]) for e in crossner.entity_spans(tokens, tags)] == [
      ("person", 0, 2), ("location", 2, 3), ("misc", 4, 5), ("misc", 5, 6)]


def test_crossner_entity_types_match_the_readme(raw_data_dir):
  types = {e["type"] for s in crossner.SPLITS
           for sent in crossner.read_conll(raw_data_dir / "crossner" / crossner.split_file("music", s))
           for e in sent["entities"]}
  assert sorted(types) == ["album", "award", "band", "country", "event", "location", "misc", "musicalartist",
                           "musicalinstrument", "musicgenre", "organisation", "person", "song"]
  described = crossner.entity_attributes(sorted(types))
  assert described["musicalartist"] == {"description": "musical artist", "general": False}
  assert described["person"] == {"description": "person", "general": True}


def test_crossner_malformed_line_names_file_and_line(tmp_path):
  path = tmp_path / "dev.txt"
  path.write_text("a\tO\nb c O\n")
  with pytest.raises(DataError, match=r"dev.txt:2: line 'b c O' has 1 tab-separated fields"):
    list(crossner.read_conll(path))
  path.write_text("a\tO\nb\tX-band\n")
  with pytest.raises(DataError, match=r"dev.txt:2: field 'tag' is 'X-band'"):
    list(crossner.read_conll(path))


# --- TOPv2 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("domain", sorted(TOPV2_ROWS))
def test_topv2_row_counts(raw_data_dir, domain):
  counts = tuple(sum(1 for _ in topv2.read_tsv(raw_data_dir / "topv2" / topv2.split_file(domain, s))) for s in topv2.SPLITS)
  assert counts == TOPV2_ROWS[domain]


def test_topv2_low_resource_files_with_seqlogical_header(raw_data_dir):
  path = raw_data_dir / "topv2" / topv2.low_resource_file("weather", "train", 25)
  assert path.read_text().splitlines()[0].split("\t")[2] == "seqlogical"
  rows = list(topv2.read_tsv(path))
  assert len(rows) == 176
  assert rows[0]["utterance"] == "How hot is it going to get today?"
  assert rows[0]["slots"] == [{"type": "WEATHER_ATTRIBUTE", "value": "hot"}, {"type": "DATE_TIME", "value": "today"}]


def test_topv2_quotes_are_kept(raw_data_dir):
  """Six music utterances start with a double quote; default csv quoting would strip them."""
  starts = []
  for s in topv2.SPLITS:
    path = raw_data_dir / "topv2" / topv2.split_file("music", s)
    starts += [r["utterance"] for r in topv2.read_tsv(path) if r["utterance"].startswith('"')]
    with open(path, newline="") as f:  # what the bug looked like: same row count, quotes gone
      default = [row[1] for row in csv.reader(f, delimiter="\t")][1:]
    assert not any(u.startswith('"') for u in default)
  assert len(starts) == 6
  assert '"In The End" is a song by Linkin Park.' in starts


PARSE = ("[IN:CREATE_REMINDER remind [SL:PERSON_REMINDED me ] to [SL:TODO take my meds ] [SL:RECURRING_DATE_TIME "
         "[IN:GET_RECURRING_DATE_TIME [SL:DATE_TIME at 8 am ] and [SL:DATE_TIME 6 pm ] [SL:FREQUENCY daily ] ] ] ]")


def test_topv2_nested_parse_by_hand():
  intents, slots = topv2.parse_labels(PARSE)
  assert intents == ["CREATE_REMINDER", "GET_RECURRING_DATE_TIME"]
  assert slots == [{"type": "PERSON_REMINDED", "value": "me"}, {"type": "TODO", "value": "take my meds"},
                   {"type": "RECURRING_DATE_TIME", "value": "at 8 am and 6 pm daily"},
                   {"type": "DATE_TIME", "value": "at 8 am"}, {"type": "DATE_TIME", "value": "6 pm"},
                   {"type": "FREQUENCY", "value": "daily"}]
  utterance = "remind me to take my meds at 8am and 6pm daily"  # as TOPv2 writes utterances: "8am", not "8 am"
  spans = topv2.slot_spans(utterance, PARSE)
  assert [(s["type"], utterance[s["start"]:s["end"]]) for s in spans] == [
      ("PERSON_REMINDED", "me"), ("TODO", "take my meds"), ("RECURRING_DATE_TIME", "at 8am and 6pm daily"),
      ("DATE_TIME", "at 8am"), ("DATE_TIME", "6pm"), ("FREQUENCY", "daily")]
  example = topv2.to_example({"utterance": utterance, "intents": intents, "slots": slots, "spans": spans}, "x", "reminder")
  assert example.attributes == {"intents": ("CREATE_REMINDER", "GET_RECURRING_DATE_TIME"),
                                "slots": ("DATE_TIME", "FREQUENCY", "PERSON_REMINDED", "RECURRING_DATE_TIME", "TODO")}
  assert example.values == ("me", "take my meds", "at 8am and 6pm daily", "at 8am", "6pm", "daily")
  assert example.spans == tuple(spans)


def test_topv2_empty_slot_is_zero_width_where_the_next_word_starts():
  utterance = "set alarms for 30,32 and 35 minutes"  # alarm_eval.tsv
  spans = topv2.slot_spans(utterance, "[IN:CREATE_ALARM set alarms [SL:DATE_TIME for 30,32 ] [SL:DATE_TIME ] and "
                                      "[SL:DATE_TIME 35 minutes ] ]")
  assert [(s["type"], s["start"], s["end"]) for s in spans] == [
      ("DATE_TIME", 11, 20), ("DATE_TIME", 21, 21), ("DATE_TIME", 25, 35)]


def test_topv2_inventory_and_general_labels_from_all_domains(raw_data_dir):
  used = {d: topv2.labels_used(tuple(raw_data_dir / "topv2" / topv2.split_file(d, s) for s in topv2.SPLITS))
          for d in topv2.DOMAINS}
  weather = topv2.label_attributes(used, "weather")
  assert sorted(weather["intents"]) == ["GET_CONTACT", "GET_INFO_CONTACT", "GET_LOCATION", "GET_SUNRISE",
                                        "GET_SUNSET", "GET_WEATHER", "UNSUPPORTED_WEATHER"]
  assert len(weather["slots"]) == 11
  assert weather["intents"]["GET_WEATHER"] == {"description": "get weather", "general": False}
  # Independently: which labels does another domain's raw text use?
  others = "\n".join((raw_data_dir / "topv2" / topv2.split_file(d, s)).read_text()
                     for d in topv2.DOMAINS if d != "weather" for s in topv2.SPLITS)
  for kind, prefix in (("intents", "IN"), ("slots", "SL")):
    for name, attribute in weather[kind].items():
      assert attribute["general"] == bool(re.search(rf"\[{prefix}:{name} ", others)), name
  reminder = topv2.label_attributes(used, "reminder")
  assert (len(reminder["intents"]), len(reminder["slots"])) == (19, 32)


def test_topv2_bad_rows_name_file_line_and_field(tmp_path):
  path = tmp_path / "x_train.tsv"
  path.write_text("domain\tutterance\tsemantic_parse\nweather\thi\t[IN:GET_WEATHER hi ]\nweather\thi\n")
  with pytest.raises(DataError, match=r"x_train.tsv:3: 2 tab-separated fields; expected 3"):
    list(topv2.read_tsv(path))
  path.write_text("domain\tutterance\tsemantic_parse\nweather\thi\t[IN:GET_WEATHER [SL:DATE_TIME hi ]\n")
  with pytest.raises(DataError, match=r"x_train.tsv:2: field 'semantic_parse' is .* expected one balanced"):
    list(topv2.read_tsv(path))
  path.write_text("domain\tutterance\tsemantic_parse\nweather\tis it hot\t[IN:GET_WEATHER is it [SL:WEATHER_ATTRIBUTE cold ] ]\n")
  with pytest.raises(DataError, match=r"x_train.tsv:2: parse word 'cold' is not at character 6 of the utterance 'is it hot'"):
    list(topv2.read_tsv(path))
  path.write_text("domain\ttext\tparse\n")
  with pytest.raises(DataError, match=r"x_train.tsv:1: header is .* expected domain, utterance"):
    list(topv2.read_tsv(path))


# --- Missing data ----------------------------------------------------------------------------------

def test_missing_data_dir_says_where_to_put_which_files(tmp_path, monkeypatch):
  monkeypatch.setenv("MSP_DATA_DIR", str(tmp_path))
  assert find_local("crossner", ["ner_data/music/train.txt"]) is None
  message = str(missing_data_error("crossner", ["ner_data/music/train.txt"], "https://github.com/zliucr/CrossNER"))
  assert f"MSP_DATA_DIR={tmp_path}" in message and "ner_data/music/train.txt under <root>/crossner/" in message
  assert "download=True" in message and "\n" not in message
  (tmp_path / "crossner").mkdir()
  with pytest.raises(DataError, match="raw files are missing"):
    find_local("crossner", ["ner_data/music/train.txt"])
