"""Variants of one grid method scored on the dev split only: decoding sweeps and the lever ablations.

  python benchmarks/dev_sweep.py --task nlupp/hotels --method attention --seeds 2 \
      --variant default: --variant t1.2:temperature=1.2 --variant p1:top_p=1.0 [--set learning_rate=0.1 ...] \
      [--workdir /tmp/dev_sweep] [--json out.json]

Each variant is `name:field=value,...` over configs/experiment.py (after the `--set` fields every variant
shares); `method=...` in a variant switches the grid method (seed, eda, in_context, prompt_tuning, a mixer).
For each variant and seed k it does what the grid does for a row (`msp_jax/experiment.py`): train seed k's
prompts (reused by every variant with the same training fields), generate, apply the consistency filter,
take the seeded subsample of the grid's target count, and fit the downstream model on seeds + that data
with its choices made on dev. The score is that run's dev score (the selection's): the test split is
never loaded into a choice here, so these numbers may choose the grid's defaults. Prints one line per
run and a table (mean ± std over seeds), and keeps every piece in the workdir, keyed like the grid's,
so an interrupted or extended sweep resumes. `--grid results` reuses the grid's own generations wherever a
variant asks for exactly what the grid made (e.g. the consistency filters, which only select from the grid's
pool), and its trained prompts (copied) where a variant changes only how they are sampled (a decoding sweep).
`--first_seed K` starts at seed K (e.g. a seed whose prompts the grid kept). `--set source_data=True` adds
the grid's domain-adaptation source sample to every run's training set (embedded once for all variants).

`method=real` (here only, never in the grid) is the ceiling no generator can pass: the same number of
*real* gold-labelled utterances, drawn (seeded) from the task's held-out test examples, in place of
synthetic ones. Only dev is scored, so the test examples serve as a pool of real text and are never a score;
it says how much any added data of this size could lift the model, against which a generator's gain is read.
`method=real_seed_labels` draws them only among the utterances whose label set is one of the seeds' label
sets, the labels MSP is mostly asked to write (all but `combination_fraction` of its requests): real text
under the generator's label distribution, which separates what the text adds from what new labels add.
"""
import argparse
import ast
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for `python benchmarks/X.py`

import numpy as np

from benchmarks.machine import describe
from configs import experiment as experiment_config
from msp_jax import augment, assembly, config_keys, consistency, experiment, files, provenance, task_models
from msp_jax.data import load_task
from msp_jax.models.weights import load_backbone


def parse_fields(c, text: str) -> dict:
  """`field=value,...` typed like the config's field (tuples and lists as Python literals)."""
  out = {}
  for item in filter(None, (x.strip() for x in split_top_level(text))):
    field, sep, value = item.partition("=")
    if not sep or (field not in c and field != "method"):
      raise SystemExit(f"error: {item!r}: expected field=value with a field of configs/experiment.py (or method)")
    old = c.get(field)
    out[field] = (value if field == "method" or isinstance(old, str) else
                  value.lower() in ("1", "true") if isinstance(old, bool) else ast.literal_eval(value))
  return out


def split_top_level(text: str) -> list[str]:
  """Splits on commas outside brackets: `buckets=(64, 128),top_p=0.9` is two items."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += ch in "([" and 1 or ch in ")]" and -1 or 0
    if ch == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
  return items + [text[start:]]


def prompts_dir(root: str, m) -> str:
  """One prompt run per distinct set of training fields, shared by the variants that only differ after it."""
  return os.path.join(root, "runs", f"{os.path.basename(m.workdir)}-{provenance.stable_key(config_keys.training_fields(m.to_dict()))}")


def grid_paths(m, grid: str, dataset: str, domain: str, method: str, k: int) -> str:
  """Points `m` at what the grid (workdir `grid`) made for this row with exactly these settings; returns
  "generations", "prompts" or "". Generations made with these settings are read in place (nothing there is
  retrained, regenerated or moved aside). Prompts trained with these training fields, when only generation
  settings differ (a decoding sweep), are copied into the sweep's own prompt folder and sampled from there,
  so the grid's run stays untouched. The prompts are needed only to sample anew or by the round trip: a
  clone, which has the grid's generations but not its prompt checkpoints (`results/runs/` is not tracked),
  retrains them."""
  if not grid:
    return ""
  name = f"{dataset}_{domain}_{method}_seed{k}"
  run, output = os.path.join(grid, "runs", name), os.path.join(grid, "synthetic", f"{name}.jsonl")
  trained_with = experiment.trained_fields(run) if os.path.exists(os.path.join(run, "summary.json")) else None
  trained = trained_with is not None and (provenance.stable_key(trained_with)  # tuples in m, lists in the JSON
                                          == provenance.stable_key(config_keys.training_fields(m.to_dict())))
  made = provenance.read_key(output)
  if made is not None and made.get("key") == provenance.stable_key(experiment.generation_fields(m)):
    if method == "in_context" or not consistency.uses_roundtrip(m) or trained:
      m.workdir, m.output = run, output
      return "generations"
  if method != "in_context" and trained and not os.path.exists(os.path.join(m.workdir, "summary.json")):
    shutil.copytree(run, m.workdir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.lock"))
    return "prompts"
  return ""


def synthetic_records(c, root, name, backbone, task, dataset, domain, method, k, synonyms, judge, thresholds, grid=""):
  """Seed k's candidate added sets for one variant (the grid's row recipe), {filter: (records, what the filter
  did)} ("": EDA and seed-only), and where they came from."""
  n = experiment.synthetic_target(c, len(task.splits["train"]))
  if method == "seed":
    return {"": ([], None)}, {"target": 0}
  if method in ("real", "real_seed_labels"):  # the ceiling: real gold-labelled utterances (dev-only, see above)
    return {"": (real_records(task, n, k, seed_labels_only=method == "real_seed_labels"), None)}, {"target": n}
  if method == "eda":
    copies = experiment.subsample(experiment.eda_records(task, backbone, c.synthetic_per_example, k, synonyms), n, k)
    return {"": (copies, None)}, {"target": n}
  m = experiment.method_config(c, dataset, domain, method, k)
  m.workdir = prompts_dir(root, m)
  m.output = os.path.join(root, "synthetic", f"{name}_{dataset}_{domain}_{method}_seed{k}.jsonl")
  reused = grid_paths(m, grid, dataset, domain, method, k)
  pool, origin = experiment.generated_records(m, backbone, method, f"[{name}]", k)
  if method != "in_context" and os.path.exists(os.path.join(m.workdir, "summary.json")):
    trained = json.load(open(os.path.join(m.workdir, "summary.json")))
    origin.update(best_step=trained.get("best_step"), best_dev_loss=trained.get("best"))
  sets = {}
  for which in consistency.candidates(c):  # several: the downstream fit chooses one on dev, as the grid does
    kept, counts = experiment.consistent_records(c, backbone, m, method, pool, judge, thresholds, n, which)
    sets[which] = (experiment.subsample(kept, n, k), counts)
  origin.update(target=n, from_grid=reused)
  return sets, origin


def real_records(task, n: int, k: int, seed_labels_only: bool = False) -> list[dict]:
  """n real utterances with their gold labels, a seeded draw from the held-out test examples (with
  `seed_labels_only`, among those whose label set is a seed's; fewer than n where fewer are). Not marked
  synthetic: every word's gold tag is trusted (CrossNER's `mask_synthetic_o` skips "O" only in generations)."""
  seeds = {ex.keys() for ex in task.splits["train"]}
  pool = [dict(experiment.example_record(ex), synthetic=False) for ex in task.splits["test"]
          if not seed_labels_only or ex.keys() in seeds]
  return experiment.subsample(pool, n, k)


def filtered(counts: dict | None) -> str:
  """What the consistency filter did to one pool: `pool -> kept (classifier -n, round trip -m)`."""
  if not counts:
    return "-"
  parts = [f"{what} -{counts[key]}" for what, key in (("classifier", "dropped_classifier"), ("round trip", "dropped_roundtrip"))
           if counts.get(key) is not None]
  filled = f", {counts['filled']} filled back" if counts.get("filled") else ""
  return f"{counts['pool']} -> {counts['kept']} ({', '.join(parts)}{filled})"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", default="nlupp/hotels")
  p.add_argument("--method", default="attention")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--first_seed", type=int, default=0, help="run seeds first_seed .. first_seed + seeds - 1")
  p.add_argument("--variant", action="append", required=True, help="name:field=value,... (empty after ':' = the config)")
  p.add_argument("--set", default="", help="field=value,... applied to every variant")
  p.add_argument("--workdir", default="/tmp/dev_sweep")
  p.add_argument("--grid", default="", help="a grid workdir whose prompts and generations a variant reuses when made "
                 "with its settings (read only)")
  p.add_argument("--json", default="")
  a = p.parse_args()
  base = experiment_config.get_config()
  shared = parse_fields(base, a.set)
  base.update(**shared)
  dataset, _, domain = a.task.partition("/")
  variants = []
  for spec in a.variant:
    name, _, text = spec.partition(":")
    fields = parse_fields(base, text)
    own = config_keys.OWN_TEMPERATURE.get(fields.get("method", a.method))
    if own and base.get(own) and "temperature" in {**shared, **fields}:
      raise SystemExit(f"error: variant {name!r}: {fields.get('method', a.method)} samples at {own} "
                       f"(configs/experiment.py); set that field, not temperature")
    if {"source_data", "source_fraction"} & set(fields):
      raise SystemExit(f"error: variant {name!r}: the source data is shared by every variant; set it with --set")
    variants.append((name, fields))
  print(describe(), flush=True)
  backbone = load_backbone(base.model, dtype=base.dtype or None, param_dtype=base.param_dtype or None)
  experiment.keep_compiled_programs(a.workdir)
  task = load_task(dataset, domain, "few_shot", seed=base.seed, data_dir=base.data_dir or None)
  real = [experiment.example_record(ex) for ex in task.splits["train"]]  # every run's real training data: the seeds,
  if base.get("source_data"):  # and in domain adaptation the grid's source sample
    experiment.check_source_data(base, [(dataset, domain)])
    real += experiment.source_records(base, dataset, domain, task)[0]
  dev = list(task.splits["dev"])[:base.max_dev or None]
  cache = task_models.FeatureCache(backbone)
  judge, _ = experiment.fit_judge(dataset, task, cache, base, dev)
  synonyms = augment.embedding_synonyms(assembly.embedding_table(backbone.model), backbone.tokenizer)
  results = []
  for name, fields in variants:
    c = base.copy_and_resolve_references()
    method = fields.get("method", a.method)
    c.update(**{k: v for k, v in fields.items() if k != "method"})
    thresholds = experiment.consistency_thresholds(judge, dev, c)
    for k in range(a.first_seed, a.first_seed + a.seeds):
      start = time.time()
      sets, origin = synthetic_records(c, a.workdir, name, backbone, task, dataset, domain, method, k, synonyms,
                                       judge, thresholds, a.grid)
      which, model, on_dev = task_models.fit_on_dev(
          task, cache, c, k, {f: real + [{"synthetic": True, **r} for r in added] for f, (added, _) in sets.items()}, dev)
      synthetic, counts = sets[which]
      heads = " + ".join(f"{head} {chosen['dev_metric']}" for head, chosen in model.selection.items())
      r = {"variant": name, "fields": fields, "method": method, "seed": k,
           "dev_metric": heads if len(model.selection) == 1 else f"mean of {heads}",
           "dev_score": task_models.dev_score(model.selection), "selection": model.selection, **origin,
           "synthetic": len(synthetic), **({"consistency": counts} if counts else {}),
           **({"filter_chosen": which, "candidates_dev_score": on_dev} if len(sets) > 1 else {}),
           "seconds": round(time.time() - start, 1)}
      results.append(r)
      print(f"[{name}] seed {k}: dev {r['dev_metric']} {r['dev_score']:.4f} ({len(synthetic)} synthetic"
            f"{f'; filter {which!r} chosen on dev' if len(sets) > 1 else ''}; {r['seconds']:.0f} s)", flush=True)
  print(f"\n{a.task}: dev score, mean ± std over {a.seeds} seed(s) (generator re-trained per seed)\n")
  print("| variant | method, fields | dev score | synthetic | best prompt step | best dev loss | filter: pool -> kept |\n"
        "| --- | --- | --- | --- | --- | --- | --- |")
  for name, fields in variants:
    rows = [r for r in results if r["variant"] == name]
    scores = [r["dev_score"] for r in rows]
    loss = [r["best_dev_loss"] for r in rows if r.get("best_dev_loss") is not None]
    print(f"| {name} | {rows[0]['method']}{''.join(f', {k}={v}' for k, v in fields.items() if k != 'method')} | "
          f"{100 * np.mean(scores):.1f} ± {100 * np.std(scores):.1f} | "
          f"{'/'.join(str(r.get('synthetic', 0)) for r in rows)} | {'/'.join(str(r.get('best_step', '-')) for r in rows)} | "
          f"{f'{np.mean(loss):.3f}' if loss else '-'} | {' / '.join(filtered(r.get('consistency')) for r in rows)} |")
  if a.json:
    files.write_json_atomic(a.json, {"machine": describe(), "task": a.task, "method": a.method, "set": a.set,
                                     "results": results})


if __name__ == "__main__":
  main()
