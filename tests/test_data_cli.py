"""`python -m msp_jax.data`: split sizes, attribute inventory, one example in the prompt layout."""
import json

import pytest

from msp_jax.data.__main__ import main


@pytest.fixture
def run(raw_data_dir, tfds_dir, capsys):
  def run(*argv):
    main([*argv, f"--data_dir={tfds_dir}"])
    return capsys.readouterr().out
  return run


def test_json(run):
  info = json.loads(run("--dataset=crossner", "--domain=music", "--setting=full", "--json"))
  assert info["splits"] == {"train": 100, "dev": 380, "test": 465}
  entities = {a["name"]: a for a in info["attributes"]["entities"]}
  assert len(entities) == 13 and entities["musicalartist"]["description"] == "musical artist"
  assert entities["person"]["general"] and not entities["song"]["general"]
  assert info["example"]["target"] == ("In 2003 , the Stade de France was the primary site of the 2003 World "
                                       "Championships in Athletics .")  # the first line of ner_data/music/train.txt
  assert info["example"]["text"].startswith("Stade de France, 2003 World Championships in Athletics in the music domain:\n1) ")
  assert info["example"]["text"].endswith("\n3) ")


def test_text_with_decoded_row(run):
  out = run("--dataset=crossner", "--domain=music", "--tokenizer=default")
  assert "train    100  music train" in out and "musical artist" in out
  assert "decoded batch row" in out and "«In 2003 , the Stade de France" in out and "<|im_end|>»" in out


def test_jsonl_prints_each_example_with_the_raw_files_gold_spans(run, raw_data_dir):
  out = run("--dataset=crossner", "--domain=politics", "--setting=few_shot", "--split=test", "--jsonl")
  examples = [json.loads(line) for line in out.splitlines()]
  # ner_data/politics/test.txt, parsed here: a sentence per blank-line block, an entity per B- tag
  blocks = (raw_data_dir / "crossner/ner_data/politics/test.txt").read_text(encoding="utf-8").strip().split("\n\n")
  assert len(examples) == len(blocks) == 651
  for example, block in zip(examples, blocks):
    tokens, tags = zip(*(line.split("\t") for line in block.split("\n")))
    gold = []
    for i, tag in enumerate(tags):
      if tag.startswith("B-"):
        end = next((j for j in range(i + 1, len(tags)) if tags[j] != "I-" + tag[2:]), len(tags))
        gold.append((tag[2:], " ".join(tokens[i:end])))
    assert example["text"] == " ".join(tokens)
    assert [(s["type"], example["text"][s["start"]:s["end"]]) for s in example["spans"]] == gold
    assert all(set(s) == {"type", "start", "end"} for s in example["spans"])


def test_bad_domain_is_one_line(run):
  with pytest.raises(SystemExit, match=r"^error: crossner: unknown domain 'jazz'; valid: ai, conll2003, literature, music, politics, science$"):
    run("--dataset=crossner", "--domain=jazz")
