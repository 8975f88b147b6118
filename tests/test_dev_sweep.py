"""benchmarks/dev_sweep.py: its reuse of a grid's work (generations in place, prompts copied) and its variants' checks."""
import importlib.util
import json
import os

from configs import experiment as experiment_config
from msp_jax import experiment, provenance

_SPEC = importlib.util.spec_from_file_location(
    "dev_sweep", os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "dev_sweep.py"))
dev_sweep = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dev_sweep)


def method_config(sweep_root, **fields):
  c = experiment_config.get_config()
  c.update(**fields)
  m = experiment.method_config(c, "nlupp", "hotels", "concat", 1)
  m.workdir = dev_sweep.prompts_dir(sweep_root, m)
  m.output = os.path.join(sweep_root, "synthetic", "v_nlupp_hotels_concat_seed1.jsonl")
  return m


def make_grid(grid, m):
  """A grid workdir whose concat seed-1 row was trained and generated with `m`'s settings."""
  run = os.path.join(grid, "runs", "nlupp_hotels_concat_seed1")
  os.makedirs(run)
  json.dump({"config": m.to_dict()}, open(os.path.join(run, "metadata.json"), "w"))
  json.dump({"best": 3.3}, open(os.path.join(run, "summary.json"), "w"))
  open(os.path.join(run, ".lock"), "w").close()
  output = os.path.join(grid, "synthetic", "nlupp_hotels_concat_seed1.jsonl")
  os.makedirs(os.path.dirname(output))
  open(output, "w").close()
  provenance.write_key(output, experiment.generation_fields(m))
  return run, output


def test_same_settings_read_the_grids_generations_in_place(tmp_path):
  grid, sweep = str(tmp_path / "grid"), str(tmp_path / "sweep")
  m = method_config(sweep, consistency_filter="classifier")
  run, output = make_grid(grid, m)
  assert dev_sweep.grid_paths(m, grid, "nlupp", "hotels", "concat", 1) == "generations"
  assert (m.workdir, m.output) == (run, output)


def test_a_decoding_variant_gets_a_copy_of_the_grids_prompts_and_samples_anew(tmp_path):
  grid, sweep = str(tmp_path / "grid"), str(tmp_path / "sweep")
  run, output = make_grid(grid, method_config(sweep))
  m = method_config(sweep, temperature=0.8)
  assert dev_sweep.grid_paths(m, grid, "nlupp", "hotels", "concat", 1) == "prompts"
  assert m.workdir.startswith(sweep) and m.output.startswith(sweep)  # nothing of the grid's is written
  assert json.load(open(os.path.join(m.workdir, "summary.json"))) == {"best": 3.3}
  assert not os.path.exists(os.path.join(m.workdir, ".lock"))


def test_a_training_variant_reuses_nothing(tmp_path):
  grid, sweep = str(tmp_path / "grid"), str(tmp_path / "sweep")
  make_grid(grid, method_config(sweep))
  m = method_config(sweep, learning_rate=0.3)
  assert dev_sweep.grid_paths(m, grid, "nlupp", "hotels", "concat", 1) == ""
  assert not os.path.exists(m.workdir)


def test_the_real_data_ceiling_adds_gold_labelled_held_out_utterances(load_task):
  task = load_task("nlupp", "hotels", "few_shot", seed=0)
  n = experiment.synthetic_target(experiment_config.get_config(), len(task.splits["train"]))
  sets, origin = dev_sweep.synthetic_records(experiment_config.get_config(), "", "real", None, task, "nlupp", "hotels",
                                             "real", 1, None, None, None)
  added = sets[""][0]
  assert origin == {"target": n} and len(added) == n
  labelled = lambda ex: (ex.text, repr(sorted((k, sorted(v)) for k, v in ex.attributes.items())))
  test = {labelled(ex) for ex in task.splits["test"]}
  for r in added:  # every added utterance is a held-out (test-fold) one, with exactly its gold intents
    assert (r["text"], repr(sorted((k, sorted(v)) for k, v in r["attributes"].items()))) in test
    assert r["synthetic"] is False  # gold text: no loss masking meant for generations
  assert dev_sweep.real_records(task, n, 1) == added and dev_sweep.real_records(task, n, 2) != added  # seeded


def test_the_seed_label_ceiling_draws_real_utterances_whose_label_set_a_seed_has(load_task):
  task = load_task("nlupp", "hotels", "few_shot", seed=0)
  label_set = lambda attributes: tuple(sorted((k, tuple(sorted(v))) for k, v in attributes.items() if v))
  seeds = {label_set(ex.attributes) for ex in task.splits["train"]}
  sets, _ = dev_sweep.synthetic_records(experiment_config.get_config(), "", "real_seed_labels", None, task, "nlupp",
                                        "hotels", "real_seed_labels", 1, None, None, None)
  added = sets[""][0]
  assert added and all(label_set(r["attributes"]) in seeds for r in added)
  assert any(label_set(r["attributes"]) not in seeds for r in dev_sweep.real_records(task, len(added), 1))


def test_a_temperature_variant_of_a_baseline_with_its_own_is_a_one_line_error():
  """In-context and plain prompt tuning sample at their own temperatures: a `temperature` variant would
  silently score the config's value."""
  import subprocess
  import sys
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "dev_sweep.py")
  for args, field in [(["--method", "in_context", "--variant", "t1:temperature=1.0"], "in_context_temperature"),
                      (["--set", "temperature=0.8", "--variant", "ic:method=in_context"], "in_context_temperature"),
                      (["--method", "prompt_tuning", "--variant", "t1:temperature=1.0"], "prompt_tuning_temperature")]:
    r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and field in r.stderr, r.stderr
