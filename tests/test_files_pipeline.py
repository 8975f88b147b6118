"""A user's own folder end to end, on the tiny random Llama: the README's three commands on
examples/support_desk (train.py -> generate.py --config.balance -> evaluate.py --jsonl), a requests file,
a BIO entity folder whose requests carry values, and exported prompts equal to the checkpoint's."""
import collections
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import attention
from configs import experiment as experiment_config
from msp_jax import assembly, checkpoints, data as msp_data, experiment, export, requested, synthesis, trainer, training
from msp_jax.models.weights import load_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = "examples/support_desk"
WORKDIR = "runs/support_desk"
# The README's worked example, verbatim; the test appends the tiny model and short settings.
README = [["train.py", "--config=configs/attention.py", "--config.dataset=files", f"--config.data_path={EXAMPLE}",
           f"--config.workdir={WORKDIR}"],
          ["generate.py", "--config=configs/attention.py", "--config.dataset=files", f"--config.data_path={EXAMPLE}",
           f"--config.workdir={WORKDIR}", "--config.balance=8"],
          ["evaluate.py", f"--jsonl={WORKDIR}/synthetic/msp.jsonl", "--config.tasks=files", f"--config.data_path={EXAMPLE}"]]
SHORT = dict(n_tokens=4, batch_size=2, max_steps=2, eval_every=2, eval_batches=1, bleu_examples=0, max_new_tokens=4,
             checkpoint_every=2, warmup_steps=1, gen_batch_size=8)
BALANCE = 4  # the test's N (README: 8): fewer requests, the same rules


def raw_rows(path):
  return [json.loads(line) for line in open(os.path.join(ROOT, path), encoding="utf-8") if line.strip()]


def raw_keys(row):
  sets = row.get("attributes", {k: v for k, v in row.items() if k != "text"})
  return {(s, n) for s, names in sets.items() for n in names}


def run_main(command, workdir, overrides):
  argv = [a.replace(WORKDIR, workdir) for a in command] + [f"--config.{k}={v}" for k, v in overrides.items()]
  proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def readme(tiny_model_dir, tfds_dir, tmp_path_factory):
  """The three commands run once; (workdir, their outputs)."""
  workdir = str(tmp_path_factory.mktemp("readme") / "support_desk")
  common = dict(model=tiny_model_dir, data_dir=tfds_dir)
  outs = [run_main(README[0], workdir, dict(common, **SHORT)), run_main(README[1], workdir, dict(common, **SHORT, balance=BALANCE)),
          run_main(README[2], workdir, dict(common, quality_sample=4, downstream_steps=50))]
  return workdir, outs


def config(model_dir, tfds_dir, workdir, **extra):
  c = attention.get_config()
  c.update(model=model_dir, data_dir=tfds_dir, workdir=workdir, dataset="files", data_path=os.path.join(ROOT, EXAMPLE),
           **SHORT)
  c.update(extra)
  return c


def test_readme_train_learns_the_files_vocabulary(readme):
  workdir, _ = readme
  rows = raw_rows(f"{EXAMPLE}/train.jsonl") + raw_rows(f"{EXAMPLE}/dev.jsonl")
  expected = collections.defaultdict(set)
  for row in rows:
    for s, n in raw_keys(row):
      expected[s].add(n)
  meta = checkpoints.read_metadata(workdir)
  assert meta["attributes"] == {s: sorted(names) for s, names in sorted(expected.items())}
  assert meta["splits"] == {"train": 36, "dev": 10, "test": 0}


def test_readme_balance_brings_every_attribute_to_n(readme):
  workdir, outs = readme
  output = os.path.join(workdir, "synthetic", "msp.jsonl")
  generated = [json.loads(line) for line in open(output)]
  seeds = collections.Counter(k for row in raw_rows(f"{EXAMPLE}/train.jsonl") for k in raw_keys(row))
  made = collections.Counter((s, n) for r in generated for s, names in r["attributes"].items() for n in names)
  below = {f"{s}/{n}": BALANCE - seeds[s, n] - made[s, n] for s, n in seeds if seeds[s, n] + made[s, n] < BALANCE}
  summary = json.load(open(output + ".summary.json"))
  assert summary["shortfall"] == below and summary["short"] == bool(below)
  assert generated and {r["kind"] for r in generated} == {"balance"}
  assert any("intents/damaged_item" in line for line in outs[1].splitlines())
  first = json.loads(open(output + ".candidates").read().splitlines()[1])  # after the header: the rarest first
  rarest = min(seeds.values())
  assert min(seeds[s, n] for s, names in first["attributes"].items() for n in names) == rarest


def test_readme_evaluate_measures_the_generated_file(readme):
  workdir, outs = readme
  metrics = json.loads(outs[2][outs[2].index("{"):])
  generated = open(os.path.join(workdir, "synthetic", "msp.jsonl")).read().splitlines()
  assert metrics["examples"] == len(generated) and 0 <= metrics["attribute_f1"] <= 1
  assert metrics["judge_dev_examples"] == 5  # the odd half of the 10 dev rows


def test_requests_file_is_generated_as_asked(readme, tiny_model_dir, tfds_dir, tmp_path):
  workdir, _ = readme
  output = str(tmp_path / "requested.jsonl")
  summary = synthesis.synthesize(config(tiny_model_dir, tfds_dir, workdir, output=output,
                                        requests=os.path.join(ROOT, EXAMPLE, "requests.jsonl")))
  asked = [(row["attributes"], row["count"]) for row in raw_rows(f"{EXAMPLE}/requests.jsonl")]
  generated = [json.loads(line) for line in open(output)]
  per_line = collections.Counter()
  for r in generated:
    line = [i for i, (attributes, _) in enumerate(asked)
            if all(sorted(attributes.get(s, [])) == r["attributes"][s] for s in r["attributes"])]
    assert len(line) == 1 and r["kind"] == "requested", r
    per_line[line[0]] += 1
  short = {f"line {i + 1}": count - per_line[i] for i, (_, count) in enumerate(asked) if per_line[i] < count}
  assert summary["shortfall"] == short and summary["rounds"] <= 4


def test_unknown_requested_attribute_lists_close_matches(readme, tiny_model_dir, tfds_dir, tmp_path):
  workdir, _ = readme
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"attributes": {"intents": ["refund"]}, "count": 1}\n{"attributes": {"intents": ["refnd"]}}\n')
  output = tmp_path / "never" / "out.jsonl"
  with pytest.raises(requested.RequestError) as e:
    synthesis.synthesize(config(tiny_model_dir, tfds_dir, workdir, output=str(output), requests=str(bad)))
  assert str(e.value) == (f"{bad}:2: attribute intents/refnd is not in the trained vocabulary; close matches: refund")
  assert not output.parent.exists()


def test_exported_prompts_give_the_checkpoints_prefixes(readme, tiny_model_dir, tfds_dir, tmp_path):
  workdir, _ = readme
  out = str(tmp_path / "exported")
  export.main(["--workdir", workdir, "--out", out])
  run = assembly.build(config(tiny_model_dir, tfds_dir, workdir))
  assembly.restore_prompts(run, "best")
  loaded = export.load(out, load_backbone(tiny_model_dir))
  layout = msp_data.PromptLayout(run.task.ontology, run.task.splits["train"], 2)
  segments = [layout.segments(ex, np.random.default_rng(i)) for i, ex in enumerate(run.task.splits["dev"])]
  batch = {k: jnp.asarray(v) for k, v in msp_data.make_batch(segments, run.backbone.tokenizer, run.batch_config).items()
           if k in training.MODEL_KEYS}
  (want, want_mask), (got, got_mask) = run.model.prefix(batch), loaded.prefix(batch)
  assert np.array_equal(np.asarray(want), np.asarray(got)) and np.array_equal(np.asarray(want_mask), np.asarray(got_mask))
  fresh = assembly.make_prompts(run.config, run.task.ontology, run.backbone)  # training moved the prompts
  assert not np.array_equal(np.asarray(fresh.instruction.get_value()), np.asarray(loaded.prompts.instruction.get_value()))
  info = json.load(open(os.path.join(out, "prompts.json")))
  assert info["attributes"] == checkpoints.read_metadata(workdir)["attributes"] and info["mixture"] == "attention"


BIO_TRAIN = """Ada\tB-person\nLovelace\tI-person\nlived\tO\nin\tO\nLondon\tB-location\n
Alan\tB-person\nTuring\tI-person\nworked\tO\nat\tO\nBletchley\tB-location\n
Grace\tB-person\nHopper\tI-person\njoined\tO\nthe\tO\nNavy\tB-organisation\n
We\tO\nvisited\tO\nKraków\tB-location\nand\tO\nParis\tB-location\n
Marie\tB-person\nCurie\tI-person\nstudied\tO\nin\tO\nParis\tB-location\n
The\tO\nweather\tO\nwas\tO\nfine\tO\n
"""


def test_an_entity_folder_trains_generates_requested_values_and_is_measured(tiny_model_dir, tfds_dir, tmp_path):
  folder = tmp_path / "people"
  folder.mkdir()
  (folder / "train.txt").write_text(BIO_TRAIN, encoding="utf-8")
  (folder / "requests.jsonl").write_text('{"attributes": {"entities": {"person": ["Ada Lovelace"], "location": []}}, "count": 3}\n')
  c = config(tiny_model_dir, tfds_dir, str(tmp_path / "run"), data_path=str(folder), requests=str(folder / "requests.jsonl"),
             output=str(tmp_path / "people.jsonl"), min_value_coverage=0.0, max_generation_rounds=1)
  trainer.train(c)
  synthesis.synthesize(c)
  generated = [json.loads(line) for line in open(c.output)]
  locations = {"London", "Bletchley", "Kraków", "Paris"}  # a location value the seeds have, drawn for each request
  assert generated and all(r["values"][0] == "Ada Lovelace" and r["values"][1] in locations for r in generated)
  for r in generated:  # labels: the requested types whose values the text contains, as spans found there
    assert {s["type"] for s in r["spans"]} == set(r["attributes"]["entities"])
    assert all(r["text"][s["start"]:s["end"]].lower() == s["value"].lower() for s in r["spans"])
  m = experiment_config.get_config()
  m.update(model=tiny_model_dir, data_dir=tfds_dir, tasks="files", data_path=str(folder), quality_sample=2,
           downstream_steps=50)
  metrics = experiment.measure_file(m, c.output)
  present = [all(re.search(rf"(?<!\w){re.escape(v)}(?!\w)", r["text"], re.IGNORECASE) for v in r["values"]) for r in generated]
  assert metrics["examples"] == len(generated) and metrics["label_presence"] == sum(present) / len(present)
