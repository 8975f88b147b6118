"""The MSP paper's downstream experiment: does synthetic data make a few-shot model better?

For each task (dataset/domain, few-shot setting) and method
  seed           the real seed (training) examples only
  eda            seed + EDA copies (synonyms from the backbone's embeddings, insertion, swap, deletion)
  in_context     seed + generations of the frozen LM prompted with a hard-text instruction and exemplars
  prompt_tuning  seed + generations after plain prompt tuning (instruction prompt only)
  concat | pooling | attention | bottleneck | cnn   seed + MSP generations with that mixer
a downstream model on frozen-backbone features (NLU++: multi-label intent classifier on pooled
states; CrossNER: per-word BIO tagger; TOPv2: multi-label intent and slot-type classifiers on pooled
states, which is not TOPv2's exact-match semantic parsing) is trained with each of `num_seeds` seeds and scored on the
real test split. Each run chooses its head's L2 penalty, training steps and decision threshold on the
real dev split (`downstream.SelectionGrid`) and records the choice; the test split is scored once and
never enters selection. Every synthetic method adds the same number of examples: `synthetic_per_example`
x the seed examples, a seeded subsample of its (denoised) output. A generator that keeps fewer generates
more rounds (synthesis.py) until the target survives denoising or `max_generation_rounds` is reached;
one still short is marked '(short)' in the table and left out of the order of methods. With
`consistency_filter` (consistency.py) the pool is filtered before that subsample (by the attribute judge
and/or a round trip under the trained prompts); the count compared with the target is what the filter
kept, and each seed{k}.json records what it dropped or relabelled. Several filters (e.g. "none,classifier"):
each run trains one downstream model per filtered set and its dev score chooses which is scored on test
(`filter_chosen`), as it chooses the head's hyper-parameters.
Seed k is a whole replicate: the split stays that of `c.seed`, but seed k's prompts are trained with
seed `c.seed + k` (runs/{task}_{method}_seed{k}), its data generated with that seed
(synthetic/{task}_{method}_seed{k}.jsonl; in-context: sampled with it), and seed k's downstream model
trains on seed k's data, so the ± over seeds includes the generator's variance. Each result records
the generation file and prompt run it used.

Outputs in `c.workdir`: {task}/{method}/seed{k}.json (scores, selection), {task}/{method}/quality.json
(data-quality metrics of seed 0's synthetic set), runs/ (prompt training), synthetic/ (generations),
results.md (tables). Resumable: finished pieces are skipped; training and generation resume. Each
piece is keyed by the config fields it depends on (`<file>.key.json`; a prompt run by its metadata):
after a change that matters it is recomputed, the old copy moved aside as `*.stale-<key>`, with one
line saying which fields changed. `rescore=True` redoes the downstream runs and quality metrics only
(e.g. after changing the downstream model's code), reusing the trained prompts and generations.

`source_data=True` is the original paper's domain-adaptation setting: each downstream run also trains
on real gold-labelled data of another domain (NLU++: the other domain's 20 folds; CrossNER: a seeded
`source_fraction` of CoNLL-2003 train), labels restricted to the target's ontology. The generators
see only the target's seeds, so prompts and generations are exactly the few-shot grid's (runs/ and
synthetic/ are shared, never retrained); its results go to {task}+source/{method}/seed{k}.json and a
section of their own in results.md. NLU++ ranks them by general_intent_f1 (the original's metric).
`downstream="finetune"` (the original's protocol: the backbone writes label strings) likewise writes to
{task}+finetune/ (and {task}+source+finetune/), over the same prompts, generations and quality.json.
Fine-tuning costs minutes per candidate set where the probe costs seconds, so with
`finetune_filter="probe"` a generated row fine-tunes only on the filter the same setting's probe run chose
on dev for that method and seed (run the probe grid first); "each" fine-tunes on every candidate.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import jax
import numpy as np

from msp_jax import assembly, augment, consistency, features, files, provenance, synthesis, task_models, trainer
from msp_jax.config_keys import (DOWNSTREAM_FIELDS, FINETUNE_FIELDS, GENERATION_FIELDS, IN_CONTEXT_FIELDS, INPUT_FIELDS,
                                 NEUTRAL_FIELDS, OWN_TEMPERATURE, SPAN_TAGGER_FIELDS, keyed, training_fields)
from msp_jax import checkpoints as ckpt
from msp_jax.data import PromptLayout, load_task, nlupp, user_files
from msp_jax.data.splits import CROSSNER_SOURCE, domains, seeded_sample
from msp_jax.errors import MspError
from msp_jax.metrics import task_scores, text_quality
from msp_jax.models.weights import load_backbone
from msp_jax.prompts import MIXERS

BASELINES = ("seed", "eda", "in_context", "prompt_tuning")
METHODS = (*BASELINES, *MIXERS)
DOWNSTREAM_DATASETS = ("nlupp", "crossner", "topv2")
SOURCE_DATASETS = ("nlupp", "crossner")  # the datasets with a domain-adaptation source (config.source_data)
# The original scored NLU++ domain adaptation on the general intents only (ORIGINAL.md §8.2).
SOURCE_MAIN_METRIC = {"nlupp": "general_intent_f1"}


class ExperimentError(MspError):
  pass


def parse_list(field: str, text: str, valid=None) -> list[str]:
  items = [x.strip() for x in text.split(",") if x.strip()]
  bad = [x for x in items if valid is not None and x not in valid]
  if not items or bad:
    raise ExperimentError(f"config.{field}={text!r}: {'unknown ' + repr(bad[0]) if bad else 'empty'}; "
                          f"valid: {', '.join(valid) if valid else 'a comma-separated list'}")
  return items


def tasks_of(c) -> list[tuple[str, str]]:
  """(dataset, domain) of each `c.tasks` item; the item "files" is the folder `c.data_path` (domain "")."""
  out = []
  for item in parse_list("tasks", c.tasks):
    if item == "files":
      if not c.get("data_path"):
        raise ExperimentError("config.tasks item 'files' needs config.data_path: your folder with train.jsonl")
      out.append(("files", ""))
      continue
    dataset, _, domain = item.partition("/")
    if dataset not in DOWNSTREAM_DATASETS or not domain:
      raise ExperimentError(f"config.tasks item {item!r}: expected dataset/domain with dataset in "
                            f"{', '.join(DOWNSTREAM_DATASETS)}, or files (the folder config.data_path)")
    out.append((dataset, domain))
  return out


def method_config(c, dataset: str, domain: str, method: str, k: int = 0):
  """The train.py / generate.py config of one generating method on one task for the grid's seed k:
  training and sampling seed c.seed + k on the split of c.seed (data_seed)."""
  m = c.copy_and_resolve_references()
  m.unlock()  # data_seed is a field of method configs only (a config from flags is locked)
  name = f"{dataset}_{domain}_{method}_seed{k}"
  m.update(dataset=dataset, domain=domain, setting="few_shot", workdir=os.path.join(c.workdir, "runs", name),
           output=os.path.join(c.workdir, "synthetic", f"{name}.jsonl"), seed=c.seed + k, data_seed=c.seed,
           method="in_context" if method == "in_context" else "msp",
           mixture="none" if method == "prompt_tuning" else method if method in MIXERS else c.mixture)
  field = OWN_TEMPERATURE.get(method)
  if field and c.get(field):  # a baseline's own temperature, chosen on dev for it (not for MSP's mixers)
    m.temperature = c[field]
  return m


FINETUNE_FILTERS = ("each", "probe")  # finetune_filter: train on every filter candidate, or on the probe run's choice


def generation_fields(m) -> dict:
  """The fields a method config's generated file depends on (in-context: no prompt training)."""
  config = keyed(m.to_dict())
  if config.get("dataset") == "files":  # what the folder holds, not only where it is
    config["data"] = user_files.fingerprint(config["data_path"])
  if m.method == "in_context":
    return {k: config[k] for k in (*IN_CONTEXT_FIELDS, "data_path", "data") if k in config}
  return {k: v for k, v in config.items()  # the target (synthetic_per_example) decides how many rounds are made
          if k not in NEUTRAL_FIELDS and (k not in DOWNSTREAM_FIELDS or k in GENERATION_FIELDS)}


def result_fields(c, dataset: str, domain: str, method: str, seed: int | None) -> dict:
  """The fields a downstream result (seed{k}.json; seed None: quality.json) depends on."""
  config = keyed(dict(c.to_dict(), dataset=dataset, domain=domain, setting="few_shot"))
  if seed is None:  # quality.json measures the synthetic set alone: one file for every setting
    for field in ("source_data", "downstream", *FINETUNE_FIELDS):
      config.pop(field, None)
  if seed is None or dataset != "crossner":  # only CrossNER samples a share of its source
    config.pop("source_fraction", None)
  if dataset in ("nlupp", "topv2"):  # only the span tagger reads these (CrossNER, span-labelled files)
    for field in SPAN_TAGGER_FIELDS:
      config.pop(field, None)
  if seed is None:  # quality.json's judge is the tagger on the real seeds: no synthetic "O" to mask
    config.pop("mask_synthetic_o", None)
  if seed is None or method in ("seed", "eda"):  # the filters select generated data; quality measures the unfiltered pool
    for field in ("consistency_filter", *consistency.FIELDS, "finetune_filter"):
      config.pop(field, None)
  data = None if method in ("seed", "eda") else generation_fields(method_config(c, dataset, domain, method, seed or 0))
  inputs = {k: config[k] for k in INPUT_FIELDS}
  if dataset == "files":  # the folder and what is in it (added only here: the benchmarks' keys stay as they were)
    inputs["data"] = [config["data_path"], user_files.fingerprint(config["data_path"])]
  downstream = {k: config[k] for k in DOWNSTREAM_FIELDS if k in config}
  if seed is not None and follows_probe(c, method):  # a changed choice of the probe run makes this result stale
    downstream["probe_filter"] = probe_choice(c, dataset, domain, method, seed)[0]
  return {"method": method, "seed": seed, "inputs": inputs, "downstream": downstream, "synthetic": data}


def follows_probe(c, method: str) -> bool:
  """Whether `method`'s finetune runs train on the filter their probe run chose, not on every candidate."""
  return (c.get("downstream", "probe") == "finetune" and c.get("finetune_filter", "each") == "probe"
          and method not in ("seed", "eda") and len(consistency.candidates(c)) > 1)


def check_probe_choices(c, grid_tasks, methods) -> None:
  """Before anything loads: finetune_filter is valid, and with "probe" every probe run it follows is current."""
  if c.get("finetune_filter", "each") not in FINETUNE_FILTERS:
    raise ExperimentError(f"config.finetune_filter={c.finetune_filter!r}: valid: {', '.join(FINETUNE_FILTERS)}")
  for dataset, domain in grid_tasks:
    for method in filter(lambda m: follows_probe(c, m), methods):
      for k in range(c.num_seeds):
        chosen, path = probe_choice(c, dataset, domain, method, k)
        if chosen is None:
          raise ExperimentError(f"{path}: config.finetune_filter='probe' fine-tunes on the filter this probe run chose on "
                                f"dev, and it is missing or was made with other settings: run the same grid with "
                                f"--config.downstream=probe first, or set --config.finetune_filter=each")


def probe_choice(c, dataset: str, domain: str, method: str, seed: int) -> tuple[str | None, str]:
  """(The filter that `c`'s setting's probe run of this method and seed chose on dev, or None where that run
  is missing or was made with other settings; the run's path)."""
  probe = setting_config(c, (setting_of(c)[0], "probe"))
  path = os.path.join(task_folder(probe, dataset, domain), method, f"seed{seed}.json")
  if not current(path, result_fields(probe, dataset, domain, method, seed)):
    return None, path
  with open(path) as f:
    return json.load(f).get("filter_chosen"), path


def trained_fields(workdir: str) -> dict | None:
  """The training fields a prompt workdir was trained with (its metadata records the config); None if none."""
  meta = ckpt.read_metadata(workdir) if os.path.isdir(workdir) else None
  return None if meta is None else training_fields(meta.get("config") or {})


def set_aside_stale_prompts(m, label: str) -> None:
  """Moves a prompt workdir trained with other settings aside."""
  old, new = trained_fields(m.workdir), training_fields(m.to_dict())
  if old is not None and provenance.stable_key(old) != provenance.stable_key(new):
    aside = provenance.set_aside(m.workdir, provenance.stable_key(old))
    why = provenance.describe_change({"fields": old}, new)
    print(f"{label} prompts: {m.workdir} was {why}; retraining (old run: {aside})", flush=True)


# --- synthetic data -------------------------------------------------------------------------------

def example_record(ex) -> dict:
  """An Example in the generator's record shape (text, attributes, values, spans): its gold spans, with
  the text each covers as `value`."""
  return {"text": ex.text, "attributes": {k: list(v) for k, v in ex.attributes.items()}, "values": list(ex.values),
          "spans": [{"type": s["type"], "value": ex.text[s["start"]:s["end"]], "start": s["start"], "end": s["end"]}
                    for s in ex.spans]}


# --- domain adaptation: real data of another domain ------------------------------------------------

# A grid's setting: with or without source data, and which downstream protocol. Each has its own results
# folder and results.md section, so one workdir holds all four over the same prompts and generations.
SETTINGS = ((False, "probe"), (True, "probe"), (False, "finetune"), (True, "finetune"))


def setting_of(c) -> tuple[bool, str]:
  return bool(c.get("source_data")), c.get("downstream", "probe")


def setting_tags(c) -> list[str]:
  """What sets `c`'s setting apart from the few-shot probe grid: [], ["source"], ["finetune"] or both."""
  adapting, protocol = setting_of(c)
  return ["source"] * adapting + ["finetune"] * (protocol == "finetune")


def task_folder(c, dataset: str, domain: str) -> str:
  """Where a task's downstream results go: the few-shot probe grid's folder, or its +source / +finetune twin."""
  return os.path.join(c.workdir, f"{dataset}_{domain}" + "".join(f"+{tag}" for tag in setting_tags(c)))


def setting_config(c, setting: tuple[bool, str]):
  """`c` in one of the SETTINGS, all other fields as they are."""
  s = c.copy_and_resolve_references()
  s.unlock()  # a config from an older file may lack the fields
  s.source_data, s.downstream = setting
  return s


def check_source_data(c, grid_tasks) -> None:
  """A grid with source_data=True runs on tasks that have a source, and samples a real share of it."""
  for dataset, domain in grid_tasks:
    if dataset not in SOURCE_DATASETS or (dataset, domain) == ("crossner", CROSSNER_SOURCE):
      item = "files" if dataset == "files" else f"{dataset}/{domain}"
      raise ExperimentError(f"config.source_data=True: task {item!r} has no domain-adaptation source; valid: "
                            f"{' and '.join(SOURCE_DATASETS)} tasks (crossner other than {CROSSNER_SOURCE}, the source itself)")
  if any(d == "crossner" for d, _ in grid_tasks) and not 0 < c.source_fraction <= 1:
    raise ExperimentError(f"config.source_fraction={c.source_fraction!r}: the share of CoNLL-2003 train sampled; "
                          "valid: 0 < source_fraction <= 1")


def source_records(c, dataset: str, domain: str, task) -> tuple[list[dict], str]:
  """The real source-domain records that domain adaptation adds to every downstream run, and what they are.

  NLU++: every example of the other domain's 20 folds. CrossNER: round(source_fraction x N) of the N
  CoNLL-2003 train sentences (0.5: 7020 of 14041; at least 1), drawn without replacement by the grid's
  seed, in file order: the same sentences for every method and replicate, so the ± over seeds stays the
  generator's and the head's (the original drew each sentence with probability 0.5). Gold labels
  (`example_record`: spans from the BIO files), restricted to the target's ontology: the other domain's
  own intents, or a CoNLL type the target does not annotate, are no labels of the target task; training
  on them would need an output the target's model does not have. Never marked synthetic."""
  if dataset == "nlupp":
    (other,) = [d for d in nlupp.DOMAINS if d != domain]
    examples = load_task(dataset, domain, "cross", seed=c.seed, data_dir=c.data_dir or None).splits["train"]
    what = f"+ {other}, all {nlupp.NUM_FOLDS} folds"
  else:
    train = load_task(dataset, CROSSNER_SOURCE, "full", seed=c.seed, data_dir=c.data_dir or None).splits["train"]
    n = max(1, round(c.source_fraction * len(train)))
    examples = seeded_sample(train, n, [c.seed, 13])
    what = f"+ CoNLL-2003 sample: {n} of {len(train)} train sentences"
  allowed = {s: frozenset(task.ontology[s].names) for s in task.ontology.set_names}
  return [dict(example_record(ex.restricted(allowed)), uid=ex.uid) for ex in examples], what


def synthetic_target(c, n_seeds: int) -> int:
  """Examples every synthetic method adds: `synthetic_per_example` x the seeds the generators see."""
  return c.synthetic_per_example * min(n_seeds, c.max_seeds or n_seeds)


def generated_records(m, backbone, method: str, where: str, k: int) -> tuple[list[dict], dict]:
  """Train seed k's prompts of method config `m` (unless in-context) and generate, each only if not done
  with these settings; (the denoised records, where they came from). `where` starts the progress lines."""
  label = f"{where} {method} seed {k}"
  if not provenance.reusable(m.output, generation_fields(m), f"{label} generations"):
    if method != "in_context":
      set_aside_stale_prompts(m, label)
      if not os.path.exists(os.path.join(m.workdir, "summary.json")):
        print(f"{where} training prompts: {method} seed {k}", flush=True)
        trainer.train(m, backbone)
    print(f"{where} generating: {method} seed {k}", flush=True)
    synthesis.synthesize(m, backbone)
    provenance.write_key(m.output, generation_fields(m))
  summary = json.load(open(m.output + ".summary.json"))
  run = summary.get("prompt_run") or {}  # in-context: no prompts
  source = {"file": m.output, "prompts": None if method == "in_context" else m.workdir, "seed": m.seed,
            "rounds": summary.get("rounds", 1), "candidates": summary["candidates"], "kept": summary["kept"],
            "train_seconds": run.get("seconds"), "generate_seconds": summary.get("seconds"),
            # the prompts that generated: their dev score (select_metric) and step, and where training stopped
            "prompt_select_metric": run.get("select_metric"), "prompt_best": run.get("best"),
            "prompt_best_step": run.get("best_step"), "prompt_steps": run.get("step")}
  return [json.loads(line) for line in open(m.output)], source


def eda_records(task, backbone, per_example: int, seed: int, synonyms) -> list[dict]:
  rng = np.random.default_rng([seed, 7])
  return [example_record(ex) for ex in augment.augment_examples(task.splits["train"], per_example, rng, synonyms)]


def subsample(records: list[dict], n: int, seed: int) -> list[dict]:
  return seeded_sample(records, n, [seed, 11])


def consistency_thresholds(judge, dev, c) -> dict | None:
  """The classifier filter's thresholds (None when it is off), chosen on the odd half of the dev Examples:
  the judge was selected on the even half (`fit_judge`), so its recall there is not flattered by its own
  selection. A one-example dev split has no odd half: that one example."""
  if not consistency.uses_classifier(c):
    return None
  return consistency.choose_thresholds(judge, dev[1::2] or dev, c.downstream_thresholds, c.consistency_recall)


def consistent_records(c, backbone, m, method, pool, judge, thresholds, target: int,
                       which: str) -> tuple[list[dict], dict | None]:
  """The pool that method config `m` generated after consistency filter `which` (one of `c`'s; before the
  subsample to the target; the round trip scores under `m`'s trained prompts), and what it did: pool size,
  dropped / relabelled by the classifier, dropped by the round trip (None: not applied; in-context has
  no trained prompts to score with), and `filled`: when fewer than `target` pass, the shortfall is taken
  back from the dropped records, those nearest to passing first (round-trip rejects, which passed the
  classifier, before classifier rejects), so every method still adds the target count.
  No filter: (pool, None)."""
  if which == "none":
    return pool, None
  kept, counts = pool, {"filter": which, "action": c.consistency_action, "pool": len(pool),
                        "dropped_classifier": None, "relabelled_classifier": None, "dropped_roundtrip": None}
  rejected = []
  if which in ("classifier", "both"):
    kept, done = consistency.classifier_filter(kept, judge, thresholds, c.consistency_action)
    rejected = done["rejected"]
    counts.update(dropped_classifier=done["dropped"], relabelled_classifier=done["relabelled"], thresholds=thresholds,
                  recall_target=c.consistency_recall)
  roundtrip = which in ("roundtrip", "both") and method != "in_context"
  if roundtrip and not kept:
    counts.update(dropped_roundtrip=0, alternatives=c.consistency_alternatives, rank=c.consistency_rank)
  elif roundtrip:
    run = assembly.build(m, backbone)
    assembly.restore_prompts(run, m.checkpoint)  # the prompts this pool was generated with
    seeds = list(run.task.splits["train"])[:m.max_seeds or None]  # the sets the generator was asked for
    layout = PromptLayout(run.task.ontology, run.task.splits["train"], m.num_shot)
    scores = consistency.roundtrip_scores(kept, run.model, run.backbone.tokenizer, run.batch_config, layout, seeds,
                                          c.consistency_alternatives, m.seed, m.gen_batch_size)
    kept, dropped = consistency.roundtrip_filter(kept, scores, c.consistency_rank)
    rejected = dropped + rejected
    counts.update(dropped_roundtrip=len(dropped), alternatives=c.consistency_alternatives, rank=c.consistency_rank)
  filled = rejected[:max(0, target - len(kept))]
  counts.update(filled=len(filled), kept=len(kept) + len(filled))
  return kept + filled, counts


def fit_judge(dataset, task, cache, c, dev) -> tuple:
  """The attribute judge of generated text: a downstream model on the real seeds, chosen on the even
  half of the dev Examples; (judge, its precision/recall/F1 on the odd half), so its own error rate
  is measured on dev examples its selection never saw. It judges every requested attribute, whatever the
  downstream setting: with `source_data` an NLU++ model is selected on the general intents alone, so the
  judge is always the few-shot one (quality.json and the classifier filter are the same in both settings)."""
  few_shot = c.copy_and_resolve_references()
  with few_shot.unlocked():
    few_shot.source_data = False
  judge = task_models.model_class(task)(task, cache, few_shot, c.seed).fit([example_record(ex) for ex in task.splits["train"]],
                                                                          dev[0::2])
  held_out = dev[1::2]
  if not held_out:  # a one-example dev split (a small files dataset): nothing left to measure the judge on
    return judge, {"judge_dev_examples": 0, "judge_dev_precision": None, "judge_dev_recall": None, "judge_dev_f1": None}
  gold = [{k for k in ex.keys() if k[0] in judge.attribute_sets} for ex in held_out]
  prf = task_scores.attribute_prf(gold, judge.predict_keys([ex.text for ex in held_out]))
  return judge, {"judge_dev_examples": len(held_out), "judge_dev_precision": prf["precision"],
                 "judge_dev_recall": prf["recall"], "judge_dev_f1": prf["f1"]}


def quality(records, task, seed_model, backbone, sample_size: int = 30, draws: int = 5) -> dict:
  """Data-quality metrics of one synthetic set (attribute correctness from a model trained on real data).

  Distinct-n and self-BLEU grow or shrink with the amount of text, so they are means over `draws`
  random samples of `sample_size` texts (nan for a smaller set) and compare across methods; the
  other metrics are per text or per token averages over the whole set."""
  texts = [r["text"] for r in records]
  if not texts:
    return {"examples": 0}
  requested = [{(s, n) for s in seed_model.attribute_sets for n in r["attributes"].get(s, ())} for r in records]
  attribute = task_scores.attribute_prf(requested, seed_model.predict_keys(texts))
  nll, counts = features.text_nll(backbone, texts) if not backbone.is_encoder_decoder else (None, None)
  # Values are words of the text only where the seeds type them (CrossNER entities, TOPv2 slot values, span-
  # labelled files); NLU++'s are slot names ("time"), which a good utterance need not contain.
  surface = any(ex.typed_values for ex in task.splits["train"])
  presence = text_quality.label_presence(records)[0] if surface else None
  seeds = [ex.text for ex in task.splits["train"]]
  return {"examples": len(texts), **text_quality.sampled_diversity(texts, sample_size, draws),
          "quality_sample": sample_size, "quality_draws": draws,
          "seed_overlap_2": text_quality.ngram_overlap(texts, seeds, 2),
          "perplexity": text_quality.perplexity_from_nll(nll, counts) if nll is not None else None,
          "label_presence": presence, "attribute_precision": attribute["precision"],
          "attribute_recall": attribute["recall"], "attribute_f1": attribute["f1"]}


# --- the grid -------------------------------------------------------------------------------------

def run(c, backbone=None) -> str:
  """Runs (or resumes) the whole grid; returns the path of results.md."""
  grid_tasks, methods = tasks_of(c), parse_list("methods", c.methods, METHODS)
  if c.num_seeds < 1 or c.synthetic_per_example < 1 or c.get("max_generation_rounds", 1) < 1:
    raise ExperimentError(f"config.num_seeds={c.num_seeds}, config.synthetic_per_example={c.synthetic_per_example}, "
                          f"config.max_generation_rounds={c.get('max_generation_rounds', 1)}: all must be >= 1")
  task_models.check_selection(c)  # a bad grid fails before the backbone loads
  adapting = bool(c.get("source_data"))
  if adapting:
    check_source_data(c, grid_tasks)
  consistency.validate(c)
  task_models.check_downstream(c, [dataset for dataset, _ in grid_tasks])
  check_probe_choices(c, grid_tasks, methods)
  if c.quality_sample < 2 or c.quality_draws < 1:
    raise ExperimentError(f"config.quality_sample={c.quality_sample}, config.quality_draws={c.quality_draws}: need >= 2 and >= 1")
  keep_compiled_programs(c.workdir)
  backbone = backbone or load_backbone(c.model, dtype=c.dtype or None, param_dtype=c.param_dtype or None)
  with WallTime(c.workdir) as clock:
    return run_tasks(c, backbone, clock, grid_tasks, methods, adapting)


def run_tasks(c, backbone, clock: WallTime, grid_tasks, methods, adapting: bool) -> str:
  """The grid's loop over tasks, methods and seeds, for a config `run` has checked; returns results.md's path."""
  cache = task_models.FeatureCache(backbone)
  synonyms = augment.embedding_synonyms(assembly.embedding_table(backbone.model), backbone.tokenizer) if "eda" in methods else None
  for dataset, domain in grid_tasks:
    task = load_task(dataset, domain, "few_shot", seed=c.seed, data_dir=c.data_dir or None, data_path=c.get("data_path") or None)
    if not task.splits["test"]:
      raise ExperimentError(f"{dataset} {c.get('data_path')}: the downstream experiment scores a test split; add test.jsonl")
    seeds = [example_record(ex) for ex in task.splits["train"]]
    test = list(task.splits["test"])[:c.max_test or None]
    dev = list(task.splits["dev"])[:c.max_dev or None]
    n_synthetic = synthetic_target(c, len(seeds))
    name = f"{dataset}_{domain}"
    # read once per task: the FeatureCache then embeds the source texts once for every method and seed
    source, source_what = source_records(c, dataset, domain, task) if adapting else ([], "")
    source_info = {"examples": len(source), "what": source_what,  # which examples: a short hash of their uids
                   "uids_key": provenance.stable_key({"uids": sorted(r["uid"] for r in source)})}
    metric = (adapting and SOURCE_MAIN_METRIC.get(dataset)) or task_models.main_metric(task)
    seed_model, judge_scores = fit_judge(dataset, task, cache, c, dev)
    thresholds = consistency_thresholds(seed_model, dev, c)
    measure = lambda records: {**quality(records, task, seed_model, backbone, c.quality_sample, c.quality_draws), **judge_scores}
    for method in methods:
      folder = os.path.join(task_folder(c, dataset, domain), method)
      label = f"[{dataset}/{domain}{''.join(f' +{tag}' for tag in setting_tags(c))}] {method}"
      # the synthetic set's quality, the same in both settings: kept in the few-shot folder, keyed without source_data
      quality_path = os.path.join(c.workdir, name, method, "quality.json")
      quality_fields = result_fields(c, dataset, domain, method, None)
      todo = [k for k in range(c.num_seeds) if c.rescore or not provenance.reusable(
          os.path.join(folder, f"seed{k}.json"), result_fields(c, dataset, domain, method, k), f"{label} seed {k}")]
      if not todo:
        continue

      def synthetic_sets(k: int, filters=consistency.candidates(c)) -> tuple[dict[str, tuple[list[dict], dict | None]],
                                                                            list[dict], dict | None]:
        """Seed k's candidate added sets, {filter: (examples, what the filter did)}: one per filter in `filters`
        for generated data, one ("") for EDA's copies (they keep their seeds' labels) and seed-only's
        nothing; the set its quality is measured on (generated: the denoised pool before any filter); and
        where the generations came from."""
        if method == "seed":
          return {"": ([], None)}, [], None
        if method == "eda":
          copies = subsample(eda_records(task, backbone, c.synthetic_per_example, k, synonyms), n_synthetic, k)
          return {"": (copies, None)}, copies, None
        m = method_config(c, dataset, domain, method, k)
        pool, origin = generated_records(m, backbone, method, f"[{dataset}/{domain}]", k)
        sets = {}
        for which in filters:
          kept, counts = consistent_records(c, backbone, m, method, pool, seed_model, thresholds, n_synthetic, which)
          sets[which] = (subsample(kept, n_synthetic, k), counts)
        return sets, pool, origin

      by_probe = follows_probe(c, method)
      for k in todo:
        t0 = time.time()
        filters = [probe_choice(c, dataset, domain, method, k)[0]] if by_probe else consistency.candidates(c)
        sets, measured, origin = synthetic_sets(k, filters)
        if k == 0 and measured and (c.rescore or not provenance.reusable(quality_path, quality_fields, f"{label} quality")):
          files.write_json_atomic(quality_path, measure(measured))
          provenance.write_key(quality_path, quality_fields)
        t1 = time.time()
        # with several filters, each set trains a model and the dev split chooses which one is scored on test
        # a finetune run saves every epoch here (hours on a CPU: a killed grid resumes it), deleted once scored
        state_dir = os.path.join(c.workdir, "runs", "finetune", f"{os.path.basename(os.path.dirname(folder))}_{method}_seed{k}")
        chosen, run = task_models.downstream_run(
            task, cache, c, k, {name: seeds + source + [dict(r, synthetic=True) for r in added] for name, (added, _) in sets.items()},
            dev, test, state_dir)
        synthetic, counts = sets[chosen]
        result = {"task": f"{dataset}/{domain}", "method": method, "seed": k, "seed_examples": len(seeds),
                  "synthetic_examples": len(synthetic), "synthetic_target": 0 if method == "seed" else n_synthetic,
                  "generation": origin, **({"consistency": counts} if counts else {}),
                  **({"filter_chosen": chosen} if len(sets) > 1 or by_probe else {}),
                  **({"filter_chosen_by": "probe"} if by_probe else {}),
                  "dev_examples": len(dev), "test_examples": len(test),
                  **({"source_data": source_info} if adapting else {}), **run}
        result.update(seconds=round(time.time() - t0, 1), downstream_seconds=round(time.time() - t1, 1))
        files.write_json_atomic(os.path.join(folder, f"seed{k}.json"), result)
        provenance.write_key(os.path.join(folder, f"seed{k}.json"), result_fields(c, dataset, domain, method, k))
        shutil.rmtree(state_dir, ignore_errors=True)  # only a finetune run writes one
        print(f"{label} seed {k}: {metric} {result['scores'][metric]:.3f} ({len(synthetic)} synthetic"
              f"{f', {len(source)} source' if adapting else ''}{f'; filter {chosen!r} chosen on dev' if len(sets) > 1 else ''})",
              flush=True)
      if 0 not in todo and method != "seed" and (c.rescore or not provenance.reusable(quality_path, quality_fields, f"{label} quality")):
        measured = synthetic_sets(0, filters=())[1]  # seed 0's result was current, its quality not (no filter needed)
        if measured:
          files.write_json_atomic(quality_path, measure(measured))
          provenance.write_key(quality_path, quality_fields)
    write_table(c, grid_tasks, methods, clock.save())  # a partial table after every task
  path = write_table(c, grid_tasks, methods, clock.save())
  print(f"wrote {path}", flush=True)
  return path


def keep_compiled_programs(workdir: str) -> None:
  """XLA's persistent compilation cache in {workdir}/xla_cache (unless JAX_COMPILATION_CACHE_DIR names one):
  seeds 1 and 2 of a method, and a resumed grid, run the programs seed 0 compiled (7-12 train-step shapes
  per task, seconds each) without compiling them again."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "xla_cache"))


def current(path: str, fields: dict) -> bool:
  """`path` exists and was made from `fields` (a table never mixes in results of other settings)."""
  key = provenance.read_key(path)
  return os.path.exists(path) and key is not None and key.get("key") == provenance.stable_key(fields)


def load_results(c, grid_tasks, methods) -> dict:
  """The current results of `c`'s setting (few-shot or domain adaptation) and the synthetic sets' quality."""
  out = {}
  for dataset, domain in grid_tasks:
    for method in methods:
      folder = os.path.join(task_folder(c, dataset, domain), method)
      runs = [json.load(open(os.path.join(folder, f"seed{k}.json"))) for k in range(c.num_seeds)
              if current(os.path.join(folder, f"seed{k}.json"), result_fields(c, dataset, domain, method, k))]
      q = os.path.join(c.workdir, f"{dataset}_{domain}", method, "quality.json")
      out[dataset, domain, method] = (runs, json.load(open(q)) if current(q, result_fields(c, dataset, domain, method, None)) else None)
  return out


def mean_std(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


class WallTime:
  """`with WallTime(workdir) as clock:` the grid's wall time, summed over the invocations that built its workdir
  (a resumed grid adds up) in {workdir}/wall_time.json.

  A daemon thread saves it every `every` seconds, and `save()` whenever asked: the grid runs over many sessions
  and each ends with a kill, which must not lose that invocation's hours (saving only after each task lost
  them). Each save adds the time since this invocation's last save to what the file holds, under a lock on
  the workdir, so invocations running at once on one workdir (a domain-adaptation pass beside the grid) add up.
  """

  def __init__(self, workdir: str, every: float = 60.0):
    self.workdir, self.path, self.every = workdir, os.path.join(workdir, "wall_time.json"), every
    self._stop = threading.Event()

  def __enter__(self) -> "WallTime":
    os.makedirs(self.workdir, exist_ok=True)
    self.last = time.time()
    self.save(invocations=1)
    self._thread = threading.Thread(target=self._tick, name="wall-time", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.save()

  def _tick(self) -> None:
    while not self._stop.wait(self.every):
      self.save()

  def save(self, invocations: int = 0) -> dict:
    """Adds the time since the last save (and `invocations`) to the file; returns what it now holds. Each
    call opens its own lock, so this thread's saves and the caller's are serialised as other processes' are."""
    with files.locked(self.workdir):
      value = json.load(open(self.path)) if os.path.exists(self.path) else {"seconds": 0.0, "invocations": 0}
      now = time.time()
      value = {"seconds": round(value["seconds"] + now - self.last, 1), "invocations": value["invocations"] + invocations}
      self.last = now
      files.write_json_atomic(self.path, value)
      return value


def column_name(key: str) -> str:
  """Score keys of the original code's formulas read 'name (original)' in the tables."""
  return f"{key.removesuffix('_original')} (original)" if key.endswith("_original") else key


def reported_tasks(c, grid_tasks) -> list[tuple[str, str]]:
  """The grid's tasks, then every other benchmark task this workdir holds a folder of: an invocation over a
  subset of tasks (e.g. one resuming the rest of a grid) rewrites results.md without dropping the others."""
  others = [(dataset, domain) for dataset in DOWNSTREAM_DATASETS for domain in domains(dataset)
            if (dataset, domain) not in grid_tasks and os.path.isdir(os.path.join(c.workdir, f"{dataset}_{domain}"))]
  return list(grid_tasks) + others


def write_table(c, grid_tasks, methods, wall: dict) -> str:
  """results.md: downstream scores (mean ± std over seeds, x100) per task and setting, and data quality per method.
  A setting other than the grid's own is shown where this workdir holds current results of it, and so is a task
  other than the grid's (`reported_tasks`)."""
  own, reported = setting_of(c), reported_tasks(c, grid_tasks)
  results = {s: load_results(setting_config(c, s), reported, methods) for s in SETTINGS}
  shown = {(dataset, domain): [s for s in SETTINGS if (s == own and (dataset, domain) in grid_tasks)
                               or any(results[s][dataset, domain, m][0] for m in methods)
                               or (s == SETTINGS[0] and any(results[s][dataset, domain, m][1] for m in methods))]
           for dataset, domain in reported}  # the few-shot probe section also where only the data's quality is
  held = {s for settings in shown.values() for s in settings}
  lines = [f"# MSP downstream experiment ({c.model}, few-shot, {c.num_seeds} seeds)", "",
           f"Scores x100 on the real test split, mean ± std over seeds (the population std, numpy's ddof=0; with 3 seeds "
           f"the sample std is 1.22x it); {c.synthetic_per_example} synthetic "
           f"examples per seed example; prompt training {prompt_training(c)}. The 'dev' column is each run's selection "
           f"score on the real dev split (the choices are in each run's JSON); where a run chose among filter candidates "
           f"it is the best of them, so it favours the generators over seed-only and EDA, which have one: compare methods "
           f"on test. '(original)': the original MSP code's formula "
           f"beside the standard score. Wall time: {wall['seconds'] / 60:.1f} min over {wall['invocations']} invocation(s) "
           f"of evaluate.py.", ""]
  if any(protocol == "probe" for _, protocol in held):
    lines += ["Probe sections: linear heads on frozen features; each run chose its head's L2 penalty, training steps and "
              "decision threshold on dev.", ""]
  if any(protocol == "finetune" for _, protocol in held):
    lines += [f"'Finetune' sections (config.downstream='finetune', the original's protocol): the backbone "
              f"({c.finetune_params}) writes each utterance's label string, greedy-decoded; each run kept the epoch "
              f"(of {c.finetune_epochs}) with the best dev score.", ""]
  if any(adapting for adapting, _ in held):
    lines += ["'Domain adaptation' sections (config.source_data): each run also trained on real gold-labelled data of "
              "another domain, labels restricted to the target's; the prompts and synthetic data are the few-shot ones. "
              "NLU++ ranks them by general_intent_f1, the original's metric of this setting.", ""]
  for dataset, domain in reported:
    for i, setting in enumerate(shown[dataset, domain]):
      lines += table_section(c, dataset, domain, methods, results[setting], setting, with_quality=i == 0)
  path = os.path.join(c.workdir, "results.md")
  os.makedirs(c.workdir, exist_ok=True)
  files.write_text_atomic(path, "\n".join(lines))
  return path


def prompt_training(c) -> str:
  """How the grid's prompts were trained, in words for results.md."""
  length = f"{c.max_steps} steps" if c.max_steps else f"up to {c.num_epochs} epochs"
  stop = f", early stop after {c.patience} evaluations without improvement" if c.patience else ""
  return f"{length} at lr {c.learning_rate:g}, the best {c.select_metric} checkpoint generates{stop}"


def time_table(runs_by_method: list[tuple[str, list[dict]]]) -> list[str]:
  """Where the time went: minutes per method, summed over its seeds (a piece resumed across invocations
  counts its last invocation only; '-' where the run predates the timing)."""
  def minutes(values):
    values = [v for v in values if v is not None]
    return f"{sum(values) / 60:.1f}" if values else "-"
  def chosen(generation):  # the generating prompts' dev score and step, per seed ('-' where not recorded)
    picks = [f"{g['prompt_best']:.3f} ({g['prompt_best_step']}/{g['prompt_steps']})" if g.get("prompt_best") is not None
             else "-" for g in generation]
    return ", ".join(picks) if any(p != "-" for p in picks) else "-"
  rows, metric = [], "dev_loss"
  for m, runs in runs_by_method:
    if runs:
      generation = [r.get("generation") or {} for r in runs]
      metric = next((g["prompt_select_metric"] for g in generation if g.get("prompt_select_metric")), metric)
      rows.append(f"| {m} | {chosen(generation)} | {minutes(g.get('train_seconds') for g in generation)} | "
                  f"{minutes(g.get('generate_seconds') for g in generation)} | {minutes(r.get('downstream_seconds') for r in runs)} |")
  if not rows:
    return []
  return ["", "Prompt training and wall time (prompts: the generating checkpoint's dev score, its step / the steps trained, "
          "per seed; minutes summed over seeds, a piece resumed across invocations counts its last invocation only):", "",
          f"| method | prompts' {metric} (step/steps) | prompt training | generation | downstream |",
          "| --- | --- | --- | --- | --- |", *rows]


def table_section(c, dataset, domain, methods, results, setting: tuple[bool, str], with_quality: bool) -> list[str]:
  """One task's downstream table in one setting, and (`with_quality`) the synthetic data's quality."""
  adapting, protocol = setting
  first = next((r[0] for r in [results[dataset, domain, m][0] for m in methods] if r), {})
  metrics = list(first.get("scores", {}))
  heads = list(first.get("selection", {}))
  dev_column = [f"dev {first['selection'][heads[0]]['dev_metric']}"] if heads else []
  title = (f"{dataset}/{domain}" + (f", domain adaptation ({first.get('source_data', {}).get('what', 'source data')})"
                                    if adapting else "") + (", finetune (the original's protocol)" if protocol == "finetune" else ""))
  filters = consistency.candidates(c)
  filter_column = [] if filters == ["none"] else [f"filter (of {', '.join(filters)}; per seed)"]
  lines = [f"## {title}", "", "| method | synthetic | " + " | ".join(filter_column + dev_column + [column_name(k) for k in metrics]) + " |",
           "| --- | --- | " + " | ".join("---" for _ in filter_column + dev_column + metrics) + " |"]
  ranked, short, partial = [], [], []
  metric = ((adapting and SOURCE_MAIN_METRIC.get(dataset)) or task_models.MAIN_METRIC.get(dataset)
            or ("span_f1" if "span_f1" in first.get("scores", {}) else "micro_f1"))
  for m in methods:
    runs, _ = results[dataset, domain, m]
    if runs:
      fewest = min(runs, key=lambda r: r["synthetic_examples"])  # seeds generate separately: the worst one counts
      is_short = fewest["synthetic_examples"] < fewest["synthetic_target"]
      synth = f"{fewest['synthetic_examples']}/{fewest['synthetic_target']}" + (" (short)" if is_short else "")
      dev = [mean_std([r.get("selection", {}).get(heads[0], {}).get("dev_score") for r in runs])] if heads else []
      used = [", ".join(r.get("filter_chosen") or (r.get("consistency") or {}).get("filter") or "none" for r in runs)
              if m not in ("seed", "eda") else "-"] if filter_column else []
      name = m if len(runs) == c.num_seeds else f"{m} ({len(runs)}/{c.num_seeds} seeds)"  # a grid still running
      lines.append(f"| {name} | {synth} | " + " | ".join(used + dev + [mean_std([r["scores"].get(k) for r in runs]) for k in metrics]) + " |")
      (short if is_short else partial if len(runs) < c.num_seeds else ranked).append((m, np.mean([r["scores"][metric] for r in runs])))
  if ranked or short or partial:
    rounds = c.get("max_generation_rounds", 1)
    order = " > ".join(m for m, _ in sorted(ranked, key=lambda x: -x[1]))
    lines += ["", f"Order by mean {metric} (methods with all {c.num_seeds} seeds that added the full synthetic count "
                  f"only): {order or '-'}."]
    if partial:
      lines.append(f"Not ranked until all their seeds are done: {', '.join(m for m, _ in partial)}.")
    if short:
      filtered = " and the consistency filter" if filter_column else ""
      lines.append(f"'(short)': fewer synthetic examples survived denoising{filtered} than the target after {rounds} generation "
                   f"round(s) (the fewest of its seeds shown); not ranked against the others: {', '.join(m for m, _ in short)}.")
  lines += time_table([(m, results[dataset, domain, m][0]) for m in methods])
  q_rows = [(m, results[dataset, domain, m][1]) for m in methods if results[dataset, domain, m][1] and with_quality]
  if q_rows:
    q0 = q_rows[0][1]
    keys = [k for k in q0 if k not in ("examples", "quality_sample", "quality_draws", "judge_dev_examples")]
    sampled = (f"distinct-n and self-BLEU: mean over {q0['quality_draws']} random samples of {q0['quality_sample']} "
               f"texts each ('-' with fewer texts)" if "quality_sample" in q0 else "all metrics on the whole set")
    judged = (f"; judge_dev_*: the attribute judge's own precision/recall/F1 on {q0['judge_dev_examples']} real dev "
              f"examples it was not chosen on, i.e. how far to trust attribute_*" if "judge_dev_examples" in q0 else "")
    lines += ["", f"Synthetic data quality (seed 0's set: the denoised generations before any consistency filter, EDA's copies; {sampled}{judged}; '-': undefined):", "",
              "| method | examples | " + " | ".join(keys) + " |", "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for m, q in q_rows:
      lines.append(f"| {m} | {q['examples']} | " + " | ".join("-" if q.get(k) is None or np.isnan(q[k]) else f"{q[k]:.3f}" for k in keys) + " |")
  lines.append("")
  return lines


def measure_file(c, path: str) -> dict:
  """Data-quality metrics of one generated JSONL against the first task of `c.tasks`."""
  dataset, domain = tasks_of(c)[0]
  if not os.path.exists(path):
    raise ExperimentError(f"--jsonl={path}: no such file")
  records = []
  for i, line in enumerate(open(path)):
    try:
      r = json.loads(line)
      r["text"], r["attributes"]  # the fields every metric needs
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ExperimentError(f"{path}:{i + 1}: not a generated record ({e!r}); expected JSON with text, attributes") from None
    records.append(r)
  task_models.check_selection(c)
  backbone = load_backbone(c.model, dtype=c.dtype or None, param_dtype=c.param_dtype or None)
  task = load_task(dataset, domain, "few_shot", seed=c.seed, data_dir=c.data_dir or None, data_path=c.get("data_path") or None)
  dev = list(task.splits["dev"])[:c.max_dev or None]
  judge, judge_scores = fit_judge(dataset, task, task_models.FeatureCache(backbone), c, dev)
  return {**quality(records, task, judge, backbone, c.quality_sample, c.quality_draws), **judge_scores}
