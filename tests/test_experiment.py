"""`evaluate.py` end to end: the experiment's smoke grid on real NLU++/CrossNER data with a tiny
backbone writes a JSON per run and the results table, resumes, and refuses bad input."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("seed", "eda", "in_context", "prompt_tuning", "attention")
SCORE_KEYS = {"nlupp_hotels": {"micro_f1", "macro_f1", "micro_precision", "micro_recall", "intent_f1_original",
                               "general_intent_f1", "general_intent_f1_original"},
              "crossner_music": {"span_f1", "span_precision", "span_recall", "span_partial_f1_original"}}


def evaluate(*flags):
  proc = subprocess.run([sys.executable, "evaluate.py", "--config=configs/experiment.py:smoke", *flags], cwd=ROOT,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500)
  return proc.returncode, proc.stdout


def section(table: str, title: str) -> str:
  """A results.md section: from its title to the next one."""
  start = table.index(title)
  end = table.find("\n## ", start)
  return table[start:end if end >= 0 else None].rstrip()


def test_smoke_grid_runs_end_to_end_and_resumes(tiny_model_dir, tmp_path, raw_data_dir):
  workdir = str(tmp_path / "results")
  rc, out = evaluate(f"--config.model={tiny_model_dir}", f"--config.workdir={workdir}")
  assert rc == 0, out[-3000:]
  for task in ("nlupp_hotels", "crossner_music"):
    for method in METHODS:
      for seed in (0, 1):
        r = json.load(open(os.path.join(workdir, task, method, f"seed{seed}.json")))
        assert set(r["scores"]) == SCORE_KEYS[task] and r["test_examples"] == 48  # what each score can be: test below
        assert method != "seed" or r["synthetic_examples"] == 0
        assert r["synthetic_examples"] <= r["synthetic_target"] == (0 if method == "seed" else 6)
        (head, chosen), = r["selection"].items()  # chosen on dev, recorded per run
        grid = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1) if task == "crossner_music" else (1e-4, 1e-3, 1e-2)  # the tagger's own
        assert r["dev_examples"] == 48 and chosen["l2"] in grid and chosen["steps"] in (25, 50)
        assert 0.0 <= chosen["dev_score"] <= 1.0 and (task == "crossner_music" or 0 < chosen["threshold"] < 1)
        assert r["downstream_seconds"] > 0  # where the time goes: each piece timed
        if method not in ("seed", "eda"):  # the grid's default: with and without the classifier filter, dev chooses
          on_dev = r["candidates_dev_score"]
          assert set(on_dev) == {"none", "classifier"} and on_dev[r["filter_chosen"]] == max(on_dev.values())
        if method in ("prompt_tuning", "attention", "in_context"):
          assert r["generation"]["generate_seconds"] > 0
          assert (r["generation"]["train_seconds"] is None) == (method == "in_context")
          assert method == "in_context" or r["generation"]["train_seconds"] > 0
          if method != "in_context":  # the generating prompts' dev loss and step, from their run's summary
            g, run = r["generation"], json.load(open(os.path.join(r["generation"]["prompts"], "summary.json")))
            assert g["prompt_select_metric"] == "dev_loss" and g["prompt_best"] == run["best"] > 0
            assert 0 < g["prompt_best_step"] <= g["prompt_steps"] == run["step"]
  eda = json.load(open(os.path.join(workdir, "nlupp_hotels", "eda", "seed0.json")))
  assert eda["synthetic_examples"] == 6  # EDA always delivers its share
  quality = json.load(open(os.path.join(workdir, "nlupp_hotels", "attention", "quality.json")))
  assert {"distinct_2", "self_bleu", "perplexity", "attribute_f1", "judge_dev_f1"} <= set(quality) and quality["examples"] >= 1
  assert quality["quality_sample"] == 4 and quality["judge_dev_examples"] == 24
  table = open(os.path.join(workdir, "results.md")).read()
  assert "## nlupp/hotels" in table and "## crossner/music" in table
  assert table.count("| method | prompts' dev_loss (step/steps) | prompt training | generation | downstream |") == 2
  assert "| in_context | - | - | " in table
  attention = [json.load(open(os.path.join(workdir, "nlupp_hotels", "attention", f"seed{k}.json")))["generation"] for k in (0, 1)]
  assert (f"| attention | {attention[0]['prompt_best']:.3f} ({attention[0]['prompt_best_step']}/{attention[0]['prompt_steps']}), "
          f"{attention[1]['prompt_best']:.3f} (") in table
  assert all(f"| {m} |" in table for m in METHODS) and "span_partial_f1 (original)" in table
  assert "general_intent_f1 (original)" in table and "(paper)" not in table and "random samples of 4 texts" in table
  first = json.load(open(os.path.join(workdir, "wall_time.json")))
  assert first["invocations"] == 1 and first["seconds"] > 0

  rc, out = evaluate(f"--config.model={tiny_model_dir}", f"--config.workdir={workdir}")
  assert rc == 0 and " seed 0: " not in out and "training prompts" not in out  # everything was done
  again = json.load(open(os.path.join(workdir, "wall_time.json")))  # the resumed grid's time adds up
  assert again["invocations"] == 2 and again["seconds"] > first["seconds"]
  assert f"Wall time: {again['seconds'] / 60:.1f} min over 2 invocation(s)" in open(os.path.join(workdir, "results.md")).read()

  # resumed over one of its tasks: nothing is redone, and results.md still shows the other task, unchanged
  table = open(os.path.join(workdir, "results.md")).read()
  rc, out = evaluate(f"--config.model={tiny_model_dir}", f"--config.workdir={workdir}", "--config.tasks=crossner/music")
  assert rc == 0 and " seed 0: " not in out and "training prompts" not in out
  resumed = open(os.path.join(workdir, "results.md")).read()
  assert json.load(open(os.path.join(workdir, "wall_time.json")))["invocations"] == 3
  assert resumed.index("## crossner/music") < resumed.index("## nlupp/hotels")  # the grid's task first, then the others
  assert section(resumed, "## nlupp/hotels") == section(table, "## nlupp/hotels")

  # rescored on a machine that has the generations but not the prompt runs (a new session's checkout): the
  # results still say how the generating prompts were trained (recorded beside the generations)
  before = [json.load(open(os.path.join(workdir, "nlupp_hotels", "attention", f"seed{k}.json"))) for k in (0, 1)]
  shutil.rmtree(os.path.join(workdir, "runs"))
  rc, out = evaluate(f"--config.model={tiny_model_dir}", f"--config.workdir={workdir}", "--config.tasks=nlupp/hotels",
                     "--config.methods=attention", "--config.rescore=True")
  assert rc == 0 and " seed 0: " in out and "training prompts" not in out and "generating" not in out, out[-3000:]
  after = [json.load(open(os.path.join(workdir, "nlupp_hotels", "attention", f"seed{k}.json"))) for k in (0, 1)]
  assert [a["generation"] for a in after] == [b["generation"] for b in before]


def test_wall_time_survives_a_kill_and_adds_up_concurrent_invocations(tmp_path):
  """The grid's wall time is on disk while an invocation runs (a session's end kills it: saving only at the
  end of a task lost hours), and two invocations at once on one workdir each add their own time."""
  import threading
  import time
  from msp_jax import experiment
  path = tmp_path / "wall_time.json"
  with experiment.WallTime(str(tmp_path), every=0.05):
    time.sleep(0.5)
    running = json.loads(path.read_text())  # what a kill here would leave
  assert running["invocations"] == 1 and running["seconds"] >= 0.3
  done = threading.Barrier(2)

  def invocation():
    with experiment.WallTime(str(tmp_path), every=0.05):
      time.sleep(1.0)
      done.wait()

  threads = [threading.Thread(target=invocation) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  total = json.loads(path.read_text())
  assert total["invocations"] == 3 and total["seconds"] >= 0.5 + 2 * 1.0


@pytest.mark.parametrize("flag,message", [
    ("--config.methods=seed,gpt4", "config.methods='seed,gpt4': unknown 'gpt4'; valid: seed, eda"),
    ("--config.tasks=snips/weather", "config.tasks item 'snips/weather': expected dataset/domain"),
    ("--config.consistency_filter=judge", "config.consistency_filter='judge': unknown 'judge'; valid: none, classifier, roundtrip, both"),
    ("--config.consistency_filter=both --config.consistency_rank=4",
     "config.consistency_alternatives=3, config.consistency_rank=4: need alternatives >= 1 and 1 <= rank <= alternatives"),
])
def test_bad_grid_is_a_one_line_error(flag, message, tiny_model_dir, tmp_path):
  rc, out = evaluate(f"--config.model={tiny_model_dir}", f"--config.workdir={tmp_path}/w", *flag.split())
  assert rc != 0 and out.strip().splitlines()[-1].startswith(f"error: {message}")
  assert not os.path.exists(f"{tmp_path}/w")


def test_topv2_grid_scores_intent_sets_and_slot_types(tiny_model_dir, tmp_path, raw_data_dir):
  workdir = str(tmp_path / "topv2")
  rc, out = evaluate(f"--config.model={tiny_model_dir}", f"--config.workdir={workdir}", "--config.tasks=topv2/weather",
                     "--config.methods=seed,eda")
  assert rc == 0, out[-3000:]
  r = json.load(open(os.path.join(workdir, "topv2_weather", "seed", "seed0.json")))
  assert set(r["scores"]) == {"intent_set_accuracy", "intent_micro_f1", "slot_type_micro_f1", "slot_type_macro_f1"}
  assert all(0.0 <= v <= 1.0 for v in r["scores"].values()) and r["test_examples"] == 48
  quality = json.load(open(os.path.join(workdir, "topv2_weather", "eda", "quality.json")))
  assert 0.0 <= quality["attribute_f1"] <= 1.0 and "| intent_set_accuracy |" in open(os.path.join(workdir, "results.md")).read()


class LabelFeatures:
  """A stand-in feature extractor whose features are the gold label sets: trivially separable."""

  def __init__(self, examples, labels):
    self.features = {ex.text: np.array([float(n in ex.attributes[s]) for s in labels for n in labels[s]]) for ex in examples}

  def sentence(self, texts):
    return np.stack([self.features[t] for t in texts])


def test_topv2_model_learns_separable_intents_and_slot_types(load_task):
  from ml_collections import ConfigDict
  from msp_jax import experiment, task_models
  task = load_task("topv2", "weather", "few_shot")
  examples = list(task.splits["train"])
  labels = {s: list(task.ontology[s].names) for s in ("intents", "slots")}
  cache = LabelFeatures(examples, labels)
  c = ConfigDict({"downstream_hidden": 0, "downstream_steps": 300, "downstream_l2": (1e-3,), "downstream_eval_every": 300,
                  "downstream_thresholds": (0.5,)})
  model = task_models.ParseModel(task, cache, c, 0)
  model.fit([experiment.example_record(ex) for ex in examples], examples)
  result = model.score(examples)
  assert result["intent_set_accuracy"] >= 0.95 and result["slot_type_micro_f1"] >= 0.95, result
  keys = model.predict_keys([examples[0].text])[0]
  assert keys == {(s, n) for s in labels for n in examples[0].attributes[s]}


def test_seed_records_carry_every_gold_mention(load_task, raw_data_dir):
  from msp_jax import experiment
  from msp_jax.data import crossner
  train = load_task("crossner", "politics", "full").splits["train"]
  raw = list(crossner.read_conll(raw_data_dir / "crossner/ner_data/politics/train.txt"))
  for ex, sentence in zip(train, raw):
    record = experiment.example_record(ex)
    tokens = sentence["tokens"]
    # the raw tags, entity by entity: B- opens one, I- of its type continues it
    gold = [(t[2:], i) for i, t in enumerate(sentence["tags"]) if t.startswith("B-")]
    ends = [next((j for j in range(i + 1, len(tokens)) if sentence["tags"][j] != "I-" + t), len(tokens)) for t, i in gold]
    assert [(s["type"], s["value"]) for s in record["spans"]] == [(t, " ".join(tokens[i:e])) for (t, i), e in zip(gold, ends)]
    assert all(record["text"][s["start"]:s["end"]] == s["value"] for s in record["spans"])


# --- no stale reuse: every cached piece is keyed by the config fields that made it ------------------

def tiny_grid(model_dir, workdir, tfds_dir, **extra):
  from configs import experiment as experiment_config
  c = experiment_config.get_config("smoke")
  c.update(model=model_dir, workdir=str(workdir), data_dir=tfds_dir, tasks="nlupp/hotels", methods="seed,attention",
           num_seeds=1, max_test=16, max_seeds=4, gen_batch_size=8, max_new_tokens=6, downstream_steps=20,
           consistency_filter="none")  # the tests switch the filters on where they test them
  c.update(extra)
  return c


def run_grid(c, capsys):
  from msp_jax import experiment
  capsys.readouterr()
  experiment.run(c)
  return capsys.readouterr().out


@pytest.fixture(scope="module")
def base_grid(tiny_model_dir, tmp_path_factory, tfds_dir):
  from msp_jax import experiment
  c = tiny_grid(tiny_model_dir, tmp_path_factory.mktemp("grid") / "results", tfds_dir)
  experiment.run(c)
  return c


@pytest.mark.parametrize("change,retrains,regenerates,rescores_seed", [
    (dict(max_steps=3), True, True, False),
    (dict(temperature=1.1), False, True, False),
    (dict(downstream_steps=30), False, False, True)])
def test_grid_recomputes_what_a_changed_field_affects_and_only_that(change, retrains, regenerates, rescores_seed,
                                                                     base_grid, tmp_path, capsys):
  import shutil
  workdir = str(tmp_path / "results")
  shutil.copytree(base_grid.workdir, workdir)
  c = base_grid.copy_and_resolve_references()
  c.update(workdir=workdir, log_every=7, checkpoint_every=5)  # fields that change no result
  out = run_grid(c, capsys)
  assert " seed 0: " not in out and "generating" not in out and "recomputing" not in out, out
  before = json.load(open(os.path.join(workdir, "nlupp_hotels", "attention", "seed0.json")))

  c.update(change)
  out = run_grid(c, capsys)
  assert ("training prompts: attention" in out) == retrains and ("generating: attention" in out) == regenerates, out
  assert "attention seed 0: " in out and ("seed seed 0: " in out) == rescores_seed, out
  field = next(iter(change))
  why = [line for line in out.splitlines() if "recomputing it" in line or "retraining" in line]
  assert why and all(field in line for line in why), why  # one line per stale piece, naming the field
  stale = sorted(f for f in os.listdir(os.path.join(workdir, "nlupp_hotels", "attention")) if f.startswith("seed0.json.stale-"))
  assert len(stale) == 2 and stale[1] == stale[0] + ".key.json"  # the old result and its key, kept aside
  assert json.load(open(os.path.join(workdir, "nlupp_hotels", "attention", stale[0]))) == before
  if retrains:
    assert [d for d in os.listdir(os.path.join(workdir, "runs")) if ".stale-" in d]
    out = run_grid(dict_update(c, rescore=True), capsys)  # rescoring reuses prompts and generations
    assert "training prompts" not in out and "generating" not in out and "attention seed 0: " in out, out


def dict_update(c, **extra):
  copy = c.copy_and_resolve_references()
  copy.update(extra)
  return copy


def test_intent_model_scores_separable_labels_high_and_shuffled_labels_low(load_task):
  """NLU++ micro-F1 on the real test split, with features that are each text's gold intents: trained
  on the true labels it is near perfect; trained on the same texts with their label sets shuffled
  among the examples it can only predict unrelated intents, far below."""
  from ml_collections import ConfigDict
  from msp_jax import experiment, task_models
  task = load_task("nlupp", "hotels", "few_shot")
  train, dev, test = list(task.splits["train"]), list(task.splits["dev"]), list(task.splits["test"])
  cache = LabelFeatures(train + dev + test, {"intents": list(task.ontology["intents"].names)})
  c = ConfigDict({"downstream_hidden": 0, "downstream_steps": 300, "downstream_l2": (1e-4,),
                  "downstream_eval_every": 300, "downstream_thresholds": (0.5,)})  # one fixed choice: no selection
  records = [experiment.example_record(ex) for ex in train]
  shuffled = np.random.default_rng(0).permutation(len(records))
  wrong = [dict(r, attributes=records[j]["attributes"]) for r, j in zip(records, shuffled)]
  true_score = task_models.IntentModel(task, cache, c, 0).fit(records, dev).score(test)["micro_f1"]
  shuffled_score = task_models.IntentModel(task, cache, c, 0).fit(wrong, dev).score(test)["micro_f1"]
  assert true_score >= 0.9 and shuffled_score <= 0.3, (true_score, shuffled_score)


# --- each seed a whole replicate; every synthetic method adds the same count --------------------------

def test_each_seed_trains_and_samples_its_own_generator_and_rounds_reach_the_target(tiny_model_dir, tmp_path, tfds_dir,
                                                                                     capsys):
  workdir = tmp_path / "results"
  # keep_fraction 0.4 keeps at most 3 of a round's 8 candidates: the target (1 x 4 seeds) needs a second round
  c = tiny_grid(tiny_model_dir, workdir, tfds_dir, methods="seed,in_context,attention", num_seeds=2, keep_fraction=0.4,
                max_generation_rounds=4)
  out = run_grid(c, capsys)
  for k in (0, 1):
    assert f"training prompts: attention seed {k}" in out, out
  texts = {}
  for method in ("in_context", "attention"):
    for k in (0, 1):
      name = f"nlupp_hotels_{method}_seed{k}"
      output = os.path.join(str(workdir), "synthetic", f"{name}.jsonl")
      texts[method, k] = [json.loads(line)["text"] for line in open(output)]
      result = json.load(open(os.path.join(str(workdir), "nlupp_hotels", method, f"seed{k}.json")))
      assert result["generation"]["file"] == output and result["generation"]["seed"] == c.seed + k
      run_dir = os.path.join(str(workdir), "runs", name)
      assert result["generation"]["prompts"] == (None if method == "in_context" else run_dir)
      assert method == "in_context" or json.load(open(os.path.join(run_dir, "summary.json")))  # its own prompt run
    assert set(texts[method, 0]) != set(texts[method, 1]), method  # resampled, not the same data twice
  summary = json.load(open(os.path.join(str(workdir), "synthetic", "nlupp_hotels_attention_seed0.jsonl.summary.json")))
  assert summary["target"] == 4 and summary["rounds"] >= 2 and summary["kept"] >= 4 and not summary["short"], summary
  assert summary["candidates"] == 8 * summary["rounds"]
  result = json.load(open(os.path.join(str(workdir), "nlupp_hotels", "attention", "seed0.json")))
  assert result["synthetic_examples"] == result["synthetic_target"] == 4 and result["generation"]["rounds"] >= 2
  table = open(os.path.join(str(workdir), "results.md")).read()
  assert "| attention | 4/4 |" in table and "Order by mean micro_f1" in table, table

  # capped at one round, the same candidates leave attention short: marked, and not ranked
  c.update(max_generation_rounds=1)
  out = run_grid(c, capsys)
  assert "training prompts" not in out and "resuming: " in out, out
  row = next(line for line in open(os.path.join(str(workdir), "results.md")) if line.startswith("| attention |"))
  assert re.match(r"\| attention \| [0-3]/4 \(short\) \|", row), row  # round 1 keeps at most 3
  table = open(os.path.join(str(workdir), "results.md")).read()
  order = next(line for line in table.splitlines() if line.startswith("Order by mean micro_f1"))
  assert "attention" not in order and "seed" in order, order
  assert "not ranked against the others: " in table and "attention" in table.split("not ranked against the others: ")[1]


@pytest.mark.parametrize("field,value,kind,added_with", [
    ("mask_synthetic_o", True, "downstream", ()),
    ("max_request_values", 2, "generation", ()),
    ("source_data", True, "downstream", ("source_fraction",)),  # source_fraction only matters with source_data
    ("consistency_filter", "classifier", "filter", ("consistency_action", "consistency_recall",
                                                        "consistency_alternatives", "consistency_rank")),
    ("downstream", "finetune", "downstream", ("finetune_params", "finetune_epochs", "finetune_lr", "finetune_batch_size",
                                              "finetune_max_new_tokens", "finetune_repetition_penalty",
                                              "finetune_group_by_length", "finetune_filter", "finetune_dev_max")),
    # the probe heads never read the finetune_* fields: at downstream="probe" no value of theirs enters a key
    ("finetune_params", "prompt", "unread", ()), ("finetune_epochs", 9, "unread", ()), ("finetune_lr", 0.1, "unread", ()),
    ("finetune_batch_size", 2, "unread", ()), ("finetune_max_new_tokens", 8, "unread", ()),
    ("finetune_repetition_penalty", 1.0, "unread", ()), ("finetune_group_by_length", False, "unread", ()),
    ("finetune_filter", "each", "unread", ()), ("finetune_dev_max", 256, "unread", ())])
def test_an_added_field_at_its_old_value_keeps_every_key(field, value, kind, added_with):
  """A grid cached before a field existed stays current while the field keeps its old behaviour."""
  from configs import experiment as experiment_config
  from msp_jax import config_keys, experiment
  new = experiment_config.get_config()
  if kind != "unread":  # a grid that keeps the field at its old behaviour (the grid's own default may differ)
    new[field] = config_keys.ADDED_FIELDS[field]
  old = new.copy_and_resolve_references()
  for name in (field, *added_with):
    del old[name]  # the config as it was before the field was added

  def keys(c):
    return {method: (experiment.result_fields(c, "crossner", "music", method, 1),
                     config_keys.training_fields(experiment.method_config(c, "crossner", "music", method, 1).to_dict()),
                     experiment.generation_fields(experiment.method_config(c, "crossner", "music", method, 1)))
            for method in ("seed", "in_context", "attention")}
  assert keys(old) == keys(new)
  changed = new.copy_and_resolve_references()
  changed[field] = value
  for method, (result, training, generation) in keys(changed).items():
    # seed-only has no synthetic data: a generation field or a filter of generated data does not change its result
    assert (result != keys(old)[method][0]) == (kind == "downstream" or (kind in ("generation", "filter") and method != "seed"))
    assert training == keys(old)[method][1]  # none changes the trained prompts
    assert (generation != keys(old)[method][2]) == (kind == "generation")


def test_finetune_rows_made_with_random_batches_are_not_reused_for_grouped_ones():
  """finetune_group_by_length came after the first finetune rows: at False (how those were made) a row keeps
  its key; at True (the default) the finetune rows are made afresh."""
  from configs import experiment as experiment_config
  from msp_jax import experiment
  new = experiment_config.get_config()
  new.downstream = "finetune"
  old = new.copy_and_resolve_references()
  del old["finetune_group_by_length"]
  key = lambda c: experiment.result_fields(c, "nlupp", "hotels", "concat", 0)
  new.finetune_group_by_length = False
  assert key(new) == key(old)
  new.finetune_group_by_length = True
  assert key(new) != key(old)


def test_a_dev_sample_for_the_finetune_epoch_keeps_the_keys_of_rows_chosen_on_all_of_dev():
  """finetune_dev_max came after the NLU++ hotels finetune rows: at 0 (the whole dev split, how those were
  made) a finetune row keeps its key; a sample makes the finetune rows anew, and never the probe rows."""
  from configs import experiment as experiment_config
  from msp_jax import experiment
  new = experiment_config.get_config()
  new.downstream = "finetune"
  old = new.copy_and_resolve_references()
  del old["finetune_dev_max"]
  key = lambda c: experiment.result_fields(c, "crossner", "politics", "concat", 0)
  assert key(new) == key(old)
  new.finetune_dev_max = 256
  assert key(new) != key(old) and key(new)["downstream"]["finetune_dev_max"] == 256
  probe = lambda c: experiment.result_fields(dict_update(c, downstream="probe"), "crossner", "politics", "concat", 0)
  assert probe(new) == probe(old)


def test_slot_grouping_retrains_only_concat():
  """group_by_slots came after the grid's prompts: at False (how they were trained, the grid's setting) every
  key stays; at True only concat's prompts (whose batches it changes) and what follows from them are new."""
  from configs import experiment as experiment_config
  from msp_jax import config_keys, experiment
  new = experiment_config.get_config()
  old = new.copy_and_resolve_references()
  del old["group_by_slots"]
  training = lambda c, method: config_keys.training_fields(
      experiment.method_config(c, "nlupp", "hotels", method, 0).to_dict())
  result = lambda c, method: experiment.result_fields(c, "nlupp", "hotels", method, 0)
  methods = ("seed", "in_context", "prompt_tuning", "concat", "attention")
  assert not new.group_by_slots
  assert all(training(new, m) == training(old, m) and result(new, m) == result(old, m) for m in methods)
  new.group_by_slots = True
  assert [m for m in methods if training(new, m) != training(old, m)] == ["concat"]
  assert [m for m in methods if result(new, m) != result(old, m)] == ["concat"]


# --- domain adaptation (config.source_data): real data of another domain added to every run ----------

def source_config(tfds_dir, **extra):
  from configs import experiment as experiment_config
  c = experiment_config.get_config()
  c.update(data_dir=tfds_dir, source_data=True, **extra)
  return c


def test_nlupp_source_is_every_example_of_the_other_domain_with_the_targets_intents(load_task, raw_data_dir, tfds_dir):
  from msp_jax import experiment
  task = load_task("nlupp", "hotels", "few_shot")
  records, what = experiment.source_records(source_config(tfds_dir), "nlupp", "hotels", task)
  folder = raw_data_dir / "nlupp" / "data"
  ontology = json.load(open(folder / "ontology.json"))["intents"]
  hotels = {name for name, spec in ontology.items() if {"general", "hotels"} & set(spec["domain"])}
  raw = {f"banking/fold{f}/{i}": ex for f in range(20) for i, ex in enumerate(json.load(open(folder / "banking" / f"fold{f}.json")))}
  assert len(records) == len(raw) and what == "+ banking, all 20 folds"
  assert {r["uid"]: (r["text"], sorted(r["attributes"]["intents"])) for r in records} == {
      uid: (ex["text"], sorted(set(ex.get("intents", [])) & hotels)) for uid, ex in raw.items()}
  assert any(set(ex.get("intents", [])) - hotels for ex in raw.values())  # banking's own intents were there to drop
  assert not any(r.get("synthetic") for r in records)
  held_out = {ex.uid for split in ("dev", "test") for ex in task.splits[split]}
  assert held_out and not held_out & {r["uid"] for r in records}


def read_bio(path):
  """Sentences of a CoNLL file as (tokens, [(type, first token, end token)]), parsed here."""
  sentences, rows = [], []
  for line in list(open(path, encoding="utf-8")) + [""]:
    if line.strip():
      rows.append(line.rstrip("\n").split("\t"))
    elif rows:
      tokens, tags = [t for t, _ in rows], [g for _, g in rows]
      starts = [i for i, g in enumerate(tags) if g.startswith("B-") or (g.startswith("I-") and (i == 0 or tags[i - 1][2:] != g[2:]))]
      ends = [next((j for j in range(i + 1, len(tags)) if tags[j] != "I-" + tags[i][2:]), len(tags)) for i in starts]
      sentences.append((tokens, [(tags[i][2:], i, e) for i, e in zip(starts, ends)]))
      rows = []
  return sentences


def test_crossner_source_is_a_seeded_share_of_conll_with_its_gold_entities(load_task, raw_data_dir, tfds_dir):
  """round(source_fraction x 14041) CoNLL-2003 train sentences, drawn by the grid's seed."""
  from msp_jax import experiment
  task = load_task("crossner", "politics", "few_shot")
  raw = read_bio(raw_data_dir / "crossner" / "ner_data" / "conll2003" / "train.txt")
  politics = {t for _, entities in read_bio(raw_data_dir / "crossner" / "ner_data" / "politics" / "train.txt") for t, _, _ in entities}
  assert len(raw) == 14041 and {t for _, entities in raw for t, _, _ in entities} <= politics  # nothing dropped here
  records, what = experiment.source_records(source_config(tfds_dir, source_fraction=0.01), "crossner", "politics", task)
  assert len(records) == round(0.01 * 14041) == 140 and what == "+ CoNLL-2003 sample: 140 of 14041 train sentences"
  for r in records:
    tokens, entities = raw[int(r["uid"].removeprefix("conll2003/train/"))]
    assert r["text"] == " ".join(tokens) and not r.get("synthetic")
    assert [(s["type"], s["value"]) for s in r["spans"]] == [(t, " ".join(tokens[i:e])) for t, i, e in entities]
    assert all(r["text"][s["start"]:s["end"]] == s["value"] for s in r["spans"])
  again, _ = experiment.source_records(source_config(tfds_dir, source_fraction=0.01), "crossner", "politics", task)
  other, _ = experiment.source_records(source_config(tfds_dir, source_fraction=0.01, seed=1), "crossner", "politics", task)
  assert again == records and {r["uid"] for r in other} != {r["uid"] for r in records}


@pytest.mark.parametrize("tasks,item", [("nlupp/hotels,topv2/weather", "topv2/weather"),
                                        ("crossner/conll2003", "crossner/conll2003")])
def test_source_data_on_a_task_without_a_source_is_a_one_line_error(tasks, item, tmp_path):
  from msp_jax import experiment
  c = source_config(None, tasks=tasks, workdir=str(tmp_path / "w"), model="no-such-model")  # fails before loading it
  with pytest.raises(experiment.ExperimentError) as e:
    experiment.run(c)
  assert str(e.value).startswith(f"config.source_data=True: task {item!r} has no domain-adaptation source; valid: "
                                 "nlupp and crossner tasks") and "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w")


def test_source_fraction_outside_0_1_is_a_one_line_error(tmp_path):
  from msp_jax import experiment
  c = source_config(None, tasks="crossner/politics", source_fraction=0.0, workdir=str(tmp_path / "w"), model="no-such-model")
  with pytest.raises(experiment.ExperimentError, match=r"^config.source_fraction=0.0: .*valid: 0 < source_fraction <= 1$"):
    experiment.run(c)


def test_source_grid_reuses_the_few_shot_prompts_and_generations_and_keeps_both_settings_current(
    base_grid, tmp_path, capsys, monkeypatch, raw_data_dir):
  import collections
  import shutil
  from msp_jax import experiment, features
  workdir = str(tmp_path / "results")
  shutil.copytree(base_grid.workdir, workdir)
  embedded = []

  def spy(backbone, texts):  # the real embeddings; records which texts were computed
    embedded.extend(texts)
    return real(backbone, texts)
  real = features.text_embeddings
  monkeypatch.setattr(features, "text_embeddings", spy)
  c = dict_update(base_grid, workdir=workdir, source_data=True)
  out = run_grid(c, capsys)
  assert "training prompts" not in out and "generating" not in out and "recomputing" not in out, out
  assert "[nlupp/hotels +source] attention seed 0: general_intent_f1 " in out, out
  banking = [ex["text"] for f in range(20) for ex in json.load(open(raw_data_dir / "nlupp" / "data" / "banking" / f"fold{f}.json"))]
  assert set(banking) <= set(embedded) and max(collections.Counter(embedded).values()) == 1  # once for both methods

  few_shot = json.load(open(os.path.join(workdir, "nlupp_hotels", "seed", "seed0.json")))
  for method in ("seed", "attention"):
    r = json.load(open(os.path.join(workdir, "nlupp_hotels+source", method, "seed0.json")))
    assert r["source_data"]["examples"] == len(banking) and r["seed_examples"] == few_shot["seed_examples"]
    assert set(r["scores"]) == SCORE_KEYS["nlupp_hotels"] and r["test_examples"] == 16
  assert not [f for _, _, names in os.walk(workdir) for f in names if ".stale-" in f]
  for method in ("seed", "attention"):  # the few-shot results stay current under the few-shot config
    path = os.path.join(workdir, "nlupp_hotels", method, "seed0.json")
    assert experiment.current(path, experiment.result_fields(base_grid, "nlupp", "hotels", method, 0))
  table = open(os.path.join(workdir, "results.md")).read()
  assert "## nlupp/hotels\n" in table and "## nlupp/hotels, domain adaptation (+ banking, all 20 folds)\n" in table, table
  assert "Order by mean general_intent_f1" in table.split("domain adaptation (+ banking")[1] and "Order by mean micro_f1" in table

  out = run_grid(dict_update(c, source_data=False), capsys)  # the few-shot grid: everything current, both sections
  assert " seed 0: " not in out and "recomputing" not in out, out
  assert "## nlupp/hotels, domain adaptation (+ banking, all 20 folds)\n" in open(os.path.join(workdir, "results.md")).read()


def test_crossner_source_grid_trains_every_replicate_on_the_same_conll_sample(tiny_model_dir, tmp_path, tfds_dir, capsys):
  c = tiny_grid(tiny_model_dir, tmp_path / "results", tfds_dir, tasks="crossner/politics", methods="seed", num_seeds=2,
                source_data=True, source_fraction=0.01)
  out = run_grid(c, capsys)
  runs = [json.load(open(tmp_path / "results" / "crossner_politics+source" / "seed" / f"seed{k}.json")) for k in (0, 1)]
  assert runs[0]["source_data"] == runs[1]["source_data"] and runs[0]["source_data"]["examples"] == 140, out
  assert set(runs[0]["scores"]) == {"span_f1", "span_precision", "span_recall", "span_partial_f1_original"}
  assert "Order by mean span_f1" in open(tmp_path / "results" / "results.md").read()


@pytest.mark.parametrize("change", [dict(mask_synthetic_o=False), dict(tagger_steps=123), dict(tagger_l2=(0.5,)),
                                    dict(tagger_batch_size=77), dict(tagger_patience=3)])
def test_the_span_taggers_fields_enter_the_keys_of_span_tasks_only(change):
  """Only the span tagger reads them: NLU++ results stay current when one changes, CrossNER ones do not
  (nor CrossNER's quality.json for the tagger's grid: its attribute metrics come from a tagger on the seeds)."""
  from configs import experiment as experiment_config
  from msp_jax import experiment
  on = experiment_config.get_config()
  off = dict_update(on, **change)
  for method in ("seed", "eda", "attention"):
    assert experiment.result_fields(on, "nlupp", "hotels", method, 0) == experiment.result_fields(off, "nlupp", "hotels", method, 0)
    assert experiment.result_fields(on, "crossner", "music", method, 0) != experiment.result_fields(off, "crossner", "music", method, 0)
  quality = [experiment.result_fields(x, "crossner", "music", "attention", None) for x in (on, off)]
  assert (quality[0] == quality[1]) == ("mask_synthetic_o" in change)


def test_a_config_from_before_the_taggers_fields_keys_its_results_as_before():
  """tagger_steps 0, tagger_l2 () and tagger_batch_size 0 are the tagger as it was (downstream_steps,
  downstream_l2, full batch): out of every key."""
  from configs import experiment as experiment_config
  from msp_jax import experiment
  c = dict_update(experiment_config.get_config(), tagger_steps=0, tagger_l2=(), tagger_batch_size=0,
                  tagger_patience=0)
  old = c.copy_and_resolve_references()
  del old["tagger_steps"], old["tagger_l2"], old["tagger_batch_size"], old["tagger_patience"]
  for method, seed in (("seed", 0), ("attention", 1), ("attention", None)):
    assert experiment.result_fields(c, "crossner", "music", method, seed) == \
        experiment.result_fields(old, "crossner", "music", method, seed)


@pytest.mark.parametrize("baseline,field", [("in_context", "in_context_temperature"),
                                            ("prompt_tuning", "prompt_tuning_temperature")])
def test_a_baseline_samples_at_its_own_temperature_and_only_its_rows_are_keyed_by_it(baseline, field):
  """The in-context and plain prompt-tuning rows sample at their own temperatures (chosen on dev for each
  baseline, not for MSP) and are remade when it changes; the other rows' prompts, generations and results
  keep their keys, and a config from before the field existed keys them the same."""
  from configs import experiment as experiment_config
  from msp_jax import config_keys, experiment
  c = dict_update(experiment_config.get_config(), temperature=1.2, **{field: 1.0})
  assert experiment.method_config(c, "nlupp", "hotels", baseline, 1).temperature == 1.0
  assert experiment.method_config(c, "nlupp", "hotels", "attention", 1).temperature == 1.2
  old = c.copy_and_resolve_references()
  del old[field]  # a grid from before: the baseline at `temperature`
  assert experiment.method_config(old, "nlupp", "hotels", baseline, 1).temperature == 1.2
  other = dict_update(c, **{field: 0.8})
  for method in {"seed", "eda", "in_context", "prompt_tuning", "attention"} - {baseline}:
    assert experiment.result_fields(c, "nlupp", "hotels", method, 1) == experiment.result_fields(old, "nlupp", "hotels", method, 1)
    assert experiment.result_fields(c, "nlupp", "hotels", method, 1) == experiment.result_fields(other, "nlupp", "hotels", method, 1)
  for method in ("attention", "prompt_tuning"):  # prompts are trained the same whatever they are sampled at
    assert config_keys.training_fields(experiment.method_config(c, "nlupp", "hotels", method, 1).to_dict()) == \
        config_keys.training_fields(experiment.method_config(old, "nlupp", "hotels", method, 1).to_dict())
  keys = [experiment.result_fields(x, "nlupp", "hotels", baseline, 1) for x in (c, old, other)]
  assert keys[0] != keys[1] and keys[0] != keys[2] and keys[0]["synthetic"]["temperature"] == 1.0


def test_the_consistency_filters_settings_are_out_of_every_key_while_it_is_off():
  from configs import experiment as experiment_config
  from msp_jax import consistency, experiment
  new = dict_update(experiment_config.get_config(), consistency_filter="none")
  old = new.copy_and_resolve_references()
  for field in ("consistency_filter", *consistency.FIELDS):
    del old[field]  # a config from before the filter existed
  changed = dict_update(new, consistency_action="relabel", consistency_recall=0.5, consistency_alternatives=5,
                        consistency_rank=2)
  for method in ("seed", "in_context", "attention"):
    assert experiment.result_fields(old, "nlupp", "hotels", method, 0) == experiment.result_fields(changed, "nlupp", "hotels", method, 0)
  on = dict_update(new, consistency_filter="both")
  assert experiment.result_fields(on, "nlupp", "hotels", "attention", 0) != \
      experiment.result_fields(dict_update(on, consistency_rank=2), "nlupp", "hotels", "attention", 0)


def test_classifier_filter_in_the_grid_records_its_counts_and_adds_what_it_kept(base_grid, tmp_path, capsys):
  """The generations of the base grid, filtered by the judge: each seed's JSON has the counts, the
  table the added count, and the added examples are the target (filled back from the rejects when fewer
  pass), or the whole pool when even that is smaller."""
  import shutil
  workdir = str(tmp_path / "results")
  shutil.copytree(base_grid.workdir, workdir)
  c = dict_update(base_grid, workdir=workdir, consistency_filter="classifier", consistency_recall=0.5)
  out = run_grid(c, capsys)
  assert "training prompts" not in out and "generating" not in out and "attention seed 0: " in out, out
  result = json.load(open(os.path.join(workdir, "nlupp_hotels", "attention", "seed0.json")))
  counts = result["consistency"]
  pool = [json.loads(line) for line in open(result["generation"]["file"])]
  assert counts["pool"] == len(pool) == result["generation"]["kept"] and counts["relabelled_classifier"] == 0
  assert counts["kept"] == counts["pool"] - counts["dropped_classifier"] + counts["filled"] and counts["dropped_roundtrip"] is None
  assert counts["filled"] == max(0, min(result["synthetic_target"], counts["pool"]) - (counts["pool"] - counts["dropped_classifier"]))
  assert counts["dropped_classifier"] > 0  # the tiny model's texts: the judge rejects some (else nothing is tested)
  intents = counts["thresholds"]["intents"]
  assert intents["threshold"] in c.downstream_thresholds and intents["dev_attributes"] > 0 and counts["recall_target"] == 0.5
  assert result["synthetic_examples"] == min(result["synthetic_target"], counts["kept"])
  assert "consistency" not in json.load(open(os.path.join(workdir, "nlupp_hotels", "seed", "seed0.json")))
  synth = f"{result['synthetic_examples']}/{result['synthetic_target']}"
  assert f"| attention | {synth}" in open(os.path.join(workdir, "results.md")).read()

  # dropping every failing record vs relabelling them: the same pool, the same judge
  out = run_grid(dict_update(c, consistency_action="relabel"), capsys)
  relabelled = json.load(open(os.path.join(workdir, "nlupp_hotels", "attention", "seed0.json")))["consistency"]
  assert relabelled["dropped_classifier"] + relabelled["relabelled_classifier"] == counts["dropped_classifier"], out
  assert relabelled["kept"] - relabelled["filled"] == counts["kept"] - counts["filled"] + relabelled["relabelled_classifier"]


def test_several_filters_each_train_a_model_and_dev_chooses_the_one_scored(base_grid, tmp_path, capsys):
  """consistency_filter="none,classifier": each generated row trains on both sets and records the dev scores
  and the choice, its scores are the chosen set's; seed-only and the quality metrics (the unfiltered pool)
  are not recomputed, and the table names the filter each seed used."""
  import shutil
  workdir = str(tmp_path / "results")
  shutil.copytree(base_grid.workdir, workdir)
  c = dict_update(base_grid, workdir=workdir, consistency_filter="none,classifier", consistency_recall=0.5)
  quality = open(os.path.join(workdir, "nlupp_hotels", "attention", "quality.json")).read()
  out = run_grid(c, capsys)
  assert "training prompts" not in out and "generating" not in out and "seed seed 0" not in out, out
  assert "attention quality" not in out and "chosen on dev" in out, out
  result = json.load(open(os.path.join(workdir, "nlupp_hotels", "attention", "seed0.json")))
  on_dev = result["candidates_dev_score"]
  assert set(on_dev) == {"none", "classifier"} and result["filter_chosen"] in on_dev
  assert on_dev[result["filter_chosen"]] == max(on_dev.values()) == result["selection"]["intents"]["dev_score"]
  assert ("consistency" in result) == (result["filter_chosen"] == "classifier")
  assert open(os.path.join(workdir, "nlupp_hotels", "attention", "quality.json")).read() == quality
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| filter (of none, classifier; per seed) |" in table and f"| {result['filter_chosen']} |" in table, table
  with pytest.raises(Exception, match="'none,none': a filter named twice"):
    from msp_jax import consistency
    consistency.validate(dict_update(c, consistency_filter="none,none"))


def test_a_finetune_field_enters_the_result_key_when_finetuning():
  from configs import experiment as experiment_config
  from msp_jax import experiment
  c = experiment_config.get_config()
  c.downstream = "finetune"
  before = experiment.result_fields(c, "nlupp", "hotels", "seed", 0)
  c.finetune_epochs = 9
  after = experiment.result_fields(c, "nlupp", "hotels", "seed", 0)
  assert before != after and after["downstream"]["finetune_epochs"] == 9


def test_finetune_grid_writes_both_score_families(tiny_model_dir, tmp_path, tfds_dir, capsys, monkeypatch):
  """downstream="finetune": the backbone writes label strings for NLU++ and CrossNER; each run records its
  epoch choice and scores with the standard and the original's metrics, and results.md shows both. Each fit
  saves its epochs under runs/finetune (a killed grid resumes them), deleted once the run's result is written."""
  from msp_jax import label_generator
  c = tiny_grid(tiny_model_dir, tmp_path / "results", tfds_dir, tasks="nlupp/hotels,crossner/music", methods="seed",
                downstream="finetune", finetune_epochs=1, finetune_batch_size=16, finetune_max_new_tokens=6, max_dev=8,
                max_test=8)
  saved, fit = [], label_generator.LabelGenerator.fit

  def spy(self, *args):
    fit(self, *args)
    saved.append(args[5])  # checkpoint_dir
    assert os.path.isdir(os.path.join(args[5], "checkpoints")), args[5]
    return self
  monkeypatch.setattr(label_generator.LabelGenerator, "fit", spy)
  run_grid(c, capsys)
  runs = os.path.join(str(c.workdir), "runs", "finetune")
  assert saved == [os.path.join(runs, f"{task}+finetune_seed_seed0", "all") for task in ("nlupp_hotels", "crossner_music")]
  assert not os.listdir(runs)
  for task, head in (("nlupp_hotels", "intents"), ("crossner_music", "entities")):
    r = json.load(open(os.path.join(str(c.workdir), task + "+finetune", "seed", "seed0.json")))
    assert set(r["scores"]) == SCORE_KEYS[task] and r["test_examples"] == 8 and r["dev_examples"] == 8
    assert all(0.0 <= v <= 1.0 for v in r["scores"].values()) and r["test_labels_dropped"] >= 0
    chosen = r["selection"][head]
    assert chosen["epochs"] == 1 and len(chosen["history"]) == 1 and 0.0 <= chosen["dev_score"] <= 1.0
  table = open(os.path.join(str(c.workdir), "results.md")).read()
  assert "intent_f1 (original)" in table and "span_partial_f1 (original)" in table and "| dev span_f1 |" in table


def test_finetune_grid_shares_the_probe_grids_workdir_and_keeps_both_current(base_grid, tmp_path, capsys):
  """The finetune protocol reuses the probe grid's prompts, generations and quality.json, writes its own
  {task}+finetune folder and results.md section, and leaves the probe results current (and vice versa)."""
  import shutil
  from msp_jax import experiment
  workdir = str(tmp_path / "results")
  shutil.copytree(base_grid.workdir, workdir)
  quality = open(os.path.join(workdir, "nlupp_hotels", "attention", "quality.json")).read()
  c = dict_update(base_grid, workdir=workdir, downstream="finetune", finetune_epochs=1, finetune_batch_size=16,
                  finetune_max_new_tokens=6)
  out = run_grid(c, capsys)
  assert "training prompts" not in out and "generating" not in out and "recomputing" not in out, out
  assert "[nlupp/hotels +finetune] attention seed 0: micro_f1 " in out, out
  for method in ("seed", "attention"):
    r = json.load(open(os.path.join(workdir, "nlupp_hotels+finetune", method, "seed0.json")))
    assert r["selection"]["intents"]["epochs"] == 1 and r["test_examples"] == 16
    assert experiment.current(os.path.join(workdir, "nlupp_hotels", method, "seed0.json"),
                              experiment.result_fields(base_grid, "nlupp", "hotels", method, 0))
  assert open(os.path.join(workdir, "nlupp_hotels", "attention", "quality.json")).read() == quality
  assert not [f for _, _, names in os.walk(workdir) for f in names if ".stale-" in f]
  table = open(os.path.join(workdir, "results.md")).read()
  assert "## nlupp/hotels\n" in table and "## nlupp/hotels, finetune (the original's protocol)\n" in table, table
  assert table.count("Synthetic data quality") == 1, table

  out = run_grid(dict_update(c, downstream="probe"), capsys)  # the probe grid (finetune_* unread): all current, both sections
  assert " seed 0: " not in out and "recomputing" not in out, out
  assert "## nlupp/hotels, finetune (the original's protocol)\n" in open(os.path.join(workdir, "results.md")).read()


def test_finetune_follows_the_filter_its_probe_run_chose_on_dev(base_grid, tmp_path, capsys):
  """finetune_filter="probe": a generated row fine-tunes on the one filtered set its probe run (same setting,
  method and seed) chose on dev, and records that; without a current probe run the grid stops with the path;
  a probe run that later chooses otherwise makes the finetune result stale; seed-only's key ignores the field."""
  import shutil
  from msp_jax import experiment
  workdir = str(tmp_path / "results")
  shutil.copytree(base_grid.workdir, workdir)
  probe = dict_update(base_grid, workdir=workdir, consistency_filter="none,classifier", consistency_recall=0.5)
  finetune = dict_update(probe, downstream="finetune", finetune_filter="probe", finetune_epochs=1, finetune_batch_size=16,
                         finetune_max_new_tokens=6)
  with pytest.raises(experiment.ExperimentError,
                     match=r"nlupp_hotels/attention/seed0.json: config.finetune_filter='probe' .* --config.downstream=probe first"):
    experiment.run(finetune)  # the probe results in the copied workdir were made with another consistency_filter
  run_grid(probe, capsys)
  probe_path = os.path.join(workdir, "nlupp_hotels", "attention", "seed0.json")
  chosen = json.load(open(probe_path))["filter_chosen"]
  out = run_grid(finetune, capsys)
  assert "training prompts" not in out and "generating" not in out, out
  result = json.load(open(os.path.join(workdir, "nlupp_hotels+finetune", "attention", "seed0.json")))
  assert result["filter_chosen"] == chosen and result["filter_chosen_by"] == "probe"
  assert "candidates_dev_score" not in result  # one model fine-tuned, not one per candidate
  assert ("consistency" in result) == (chosen == "classifier")
  key = lambda: experiment.result_fields(finetune, "nlupp", "hotels", "attention", 0)
  assert key()["downstream"]["probe_filter"] == chosen
  finetuned = os.path.join(workdir, "nlupp_hotels+finetune", "attention", "seed0.json")
  assert experiment.current(finetuned, key())
  other = {"none": "classifier", "classifier": "none"}[chosen]
  json.dump(dict(json.load(open(probe_path)), filter_chosen=other), open(probe_path, "w"))  # the probe run chose otherwise
  assert not experiment.current(finetuned, key())
  seed_key = lambda c: experiment.result_fields(c, "nlupp", "hotels", "seed", 0)
  assert seed_key(finetune) == seed_key(dict_update(finetune, finetune_filter="each"))
  with pytest.raises(experiment.ExperimentError, match=r"config.finetune_filter='both': valid: each, probe"):
    experiment.run(dict_update(finetune, finetune_filter="both"))


def test_a_method_with_some_of_its_seeds_done_is_marked_and_not_ranked():
  """While the grid runs, a method with 1 of 3 seeds shows its count and stays out of the order (its one
  score would read as "± 0.0" over 3 seeds)."""
  from configs import experiment as experiment_config
  from msp_jax import experiment
  c = experiment_config.get_config()
  run = lambda f1: {"scores": {"micro_f1": f1}, "selection": {}, "synthetic_examples": 4, "synthetic_target": 4}
  results = {("nlupp", "hotels", "seed"): ([run(0.5), run(0.5), run(0.5)], None),
             ("nlupp", "hotels", "concat"): ([run(0.9)], None)}
  table = "\n".join(experiment.table_section(c, "nlupp", "hotels", ["seed", "concat"], results, (False, "probe"), False))
  assert "| concat (1/3 seeds) | 4/4 |" in table and "| seed | 4/4 |" in table, table
  order = next(line for line in table.splitlines() if line.startswith("Order by mean micro_f1"))
  assert order.endswith(": seed."), order
  assert "Not ranked until all their seeds are done: concat." in table
