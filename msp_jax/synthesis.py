"""Attribute-controlled synthesis: requests -> prompts -> sampled candidates -> denoised, labelled JSONL.

1. Requests: for each seed (training) example, `num_generations` attribute sets: mostly the seed's
   own, and a configurable fraction of new combinations drawn from the attributes' observed
   co-occurrence (so sets never seen together in the seed data appear too). Or the user's own
   (`requests`: a file of attribute combinations and counts; `balance`: every attribute up to N
   examples): see requested.py.
2. Candidates: each request is laid out like a training prompt without target (exemplars from the
   training split), prefixed with the mixed soft prompts (MSP) or a hard-text instruction
   (in-context baseline), sampled, and cut at the first stop string.
3. Denoising really filters: empty outputs, duplicates, copies of a seed or of an exemplar shown in
   the prompt, and (CrossNER/TOPv2) outputs missing a requested entity/slot value are dropped; of
   the rest the lowest-noise `keep_fraction` is kept. Noise, as in the original, mixes the embedding
   distance to the seed with how over-represented the requested attributes are in the seed set
   (`frequency_weight` on the latter), so frequent attributes are dropped first: rebalancing.
   `min_value_coverage` < 1 keeps outputs that contain that share of the requested values (a small
   LM rarely fits all of a CrossNER sentence's ~6 entities into one generation).
4. Labels are the requested attributes, and for CrossNER/TOPv2 spans found in the generated text,
   never copied from the seed; a requested type none of whose values occur is dropped from the labels.
5. Rounds: with a target (`synthetic_per_example` x seeds, set by the experiment grid), when fewer than
   the target survive denoising, another round of requests is planned and sampled (its own request and
   sampling seeds) and denoising reruns on all candidates, until the target is reached or
   `max_generation_rounds` rounds were made; the summary records the rounds and whether it fell short.
   A requests file or balance plans each later round from what is still missing (rounds differ in size).
Chunks of `gen_batch_size` requests are cut in padding order (prompt tokens; concat: attribute slots first), and
each request's exemplars and tokens come from its own seeded streams, so its prompt and text do not depend on
the chunk it lands in.
Progress is appended to `{output}.candidates` after every chunk, so an interrupted run resumes; the
file's header line names what made the candidates (checkpoint step, a hash of the restored prompts,
backbone, decoding, seeds, requests), and a run made by anything else is moved aside, not resumed.
The output file is written atomically at the end; its summary.json records the same key.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from msp_jax import assembly, checkpoints, features, files, mixers, provenance, requested, sampling, training
from msp_jax import data as msp_data
from msp_jax.assembly import ConfigError
from msp_jax.data.example import Example
from msp_jax.data.spans import label_found_values
from msp_jax.prompts import instruction_text

STOP_STRINGS = ("\n", "...")
PROGRESS_KEY = "progress_key"  # marks a progress file's header line
TOKEN_STREAM = 3  # tags the sampling keys' stream (request_prompt's exemplar draws are stream 2)


def cut(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
  """The generation up to its first stop string, stripped of a leading list number ("2) ") that the
  model copies from the exemplar list."""
  for stop in stop_strings:
    if stop in text:
      text = text[:text.index(stop)]
  return re.sub(r"^\s*\d+\)\s*", "", text).strip()


def normalise(text: str) -> str:
  return " ".join(text.lower().split())


def attribute_counts(records: list[dict]) -> dict:
  """{set: {name: how many records (candidate or output dicts) have that attribute}}."""
  counts = collections.defaultdict(collections.Counter)
  for r in records:
    for s, names in r["attributes"].items():
      counts[s].update(names)
  return {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}


def attribute_frequency(attributes: dict, seed_counts: collections.Counter) -> float:
  """The original's attribute term: mean over the attributes of their seed-set frequency, scaled by the
  most frequent attribute's (1.0 = as common as the commonest) rather than by the total, so it spans
  [0, 1] like the cosine distance whatever the number of attributes. No attribute: 0."""
  top = max(seed_counts.values(), default=1)
  freqs = [seed_counts.get((s, n), 0) / top for s, names in attributes.items() for n in names]
  return float(np.mean(freqs)) if freqs else 0.0


def denoise(candidates: list[dict], seeds: Sequence[Example], keep_fraction: float,
            embed: Callable[[list[str]], np.ndarray], frequency_weight: float = 0.5,
            min_value_coverage: float = 1.0) -> tuple[list[dict], dict]:
  """Filters candidates (dicts from `candidate_record`); returns (kept, removed count per reason).

  noise = (1 - frequency_weight) x (1 - cos(seed, candidate)) + frequency_weight x attribute_frequency:
  0.5 / 0.5 is the original's mix (ORIGINAL.md section 7).
  """
  removed = collections.Counter()
  seen, seed_texts = set(), {normalise(s.text) for s in seeds}
  survivors = []
  for c in candidates:
    key = normalise(c["text"])
    reason = ("empty" if not key else "duplicate" if key in seen else "copy_of_seed" if key in seed_texts
              else "copy_of_exemplar" if key in c["exemplars"]
              else "missing_value" if label_found_values(c) < min_value_coverage else None)
    if reason:
      removed[reason] += 1
      continue
    seen.add(key)
    survivors.append(c)
  if survivors:
    gen = embed([c["text"] for c in survivors])
    ref = embed([c["seed_text"] for c in survivors])
    cos = (gen * ref).sum(1) / np.maximum(np.linalg.norm(gen, axis=1) * np.linalg.norm(ref, axis=1), 1e-9)
    seed_counts = collections.Counter(k for s in seeds for k in s.keys())
    frequency = np.array([attribute_frequency(c["attributes"], seed_counts) for c in survivors])
    noise = (1.0 - frequency_weight) * (1.0 - cos) + frequency_weight * frequency
    keep = max(1, int(round(keep_fraction * len(survivors))))
    order = np.argsort(noise, kind="stable")
    removed["noise"] += len(survivors) - keep
    for c, n in zip(survivors, noise):
      c["noise"] = float(n)
    survivors = [survivors[i] for i in sorted(order[:keep])]
  return survivors, {k: n for k, n in removed.items() if n}


def candidate_record(request: requested.Request, text: str, prompt_text: str, method: str, decoding: dict) -> dict:
  """One generated candidate with everything denoising and the output file need."""
  exemplars = {normalise(line.split(") ", 1)[1]) for line in prompt_text.split("\n") if re.match(r"^\d+\) .", line)}
  return {"request": request.index, "text": text, "attributes": {k: list(v) for k, v in request.attributes.items()},
          "values": list(request.values), "typed_values": [list(tv) for tv in request.typed_values],
          "domain": request.seed.domain, "seed_id": request.seed.uid, "seed_text": request.seed.text,
          "kind": request.kind, "method": method, "decoding": decoding, "exemplars": sorted(exemplars)}


def output_record(c: dict) -> dict:
  keep = ("text", "attributes", "values", "spans", "domain", "seed_id", "kind", "method", "decoding", "noise")
  return {k: c[k] for k in keep if k in c}


def read_progress(path: str) -> list[dict]:
  """Candidates already generated (the header line is not one); a torn last line (killed mid-write) is
  dropped and the file mended."""
  if not os.path.exists(path):
    return []
  records, good = [], 0
  with open(path, "rb") as f:
    data = f.read()
  for line in data.splitlines(keepends=True):
    try:
      records.append(json.loads(line))
      good += len(line)
    except json.JSONDecodeError:
      break
  if good != len(data):
    with open(path, "r+b") as f:
      f.truncate(good)
  return [r for r in records if PROGRESS_KEY not in r]


def progress_header(path: str) -> dict | None:
  """The first line of a progress file if it is a header ({PROGRESS_KEY: key, "made_by": fields})."""
  try:
    with open(path) as f:
      first = json.loads(f.readline())
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  return first if isinstance(first, dict) and PROGRESS_KEY in first else None


def open_progress(path: str, made_by: dict) -> list[dict]:
  """The candidates in `path` if exactly `made_by` (checkpoint, prompts, decoding, requests, ...) produced
  them. A progress file made by anything else is moved aside, with one line saying why, and a fresh one
  is started whose header names `made_by`."""
  key = provenance.stable_key(made_by)
  header = progress_header(path)
  if os.path.exists(path) and (header or {}).get(PROGRESS_KEY) != key:
    aside = provenance.set_aside(path, header and header[PROGRESS_KEY])
    why = provenance.describe_change(header and {"fields": header.get("made_by")}, made_by)
    print(f"{path}: the candidates there were {why}; generating afresh (old file: {aside})", flush=True)
  if not os.path.exists(path):
    files.write_jsonl_atomic(path, [{PROGRESS_KEY: key, "made_by": made_by}])
    return []
  return read_progress(path)


def chunk_size(num_requests: int, size: int, i: int) -> int:
  """Requests in chunk i of a run whose rounds hold `num_requests` each, cut in chunks of `size` per round."""
  per_round = -(-num_requests // size)
  j = i % per_round
  return len(range(num_requests)[j * size:(j + 1) * size])


def drop_torn_chunks(path: str, records: list[dict], num_requests: int) -> list[dict]:
  """Drops the records of chunks only partly written (killed mid-write), so that a resumed run with the
  same gen_batch_size regenerates each such chunk whole and writes what a straight run writes."""
  counts = collections.Counter(tuple(r["chunk"]) for r in records)
  # chunk_requests: how many were written together (rounds differ in size); older files: rounds of num_requests
  written = {tuple(r["chunk"]): r.get("chunk_requests") for r in records}
  whole = {chunk for chunk, n in counts.items() if n == (written[chunk] or chunk_size(num_requests, *chunk))}
  kept = [r for r in records if tuple(r["chunk"]) in whole]
  if len(kept) != len(records):
    files.write_jsonl_atomic(path, [progress_header(path)] + kept)
  return kept


def append_progress(path: str, records: list[dict]) -> None:
  with open(path, "a") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())


def summarise(kept: list[dict], removed: dict, total: int, counts: dict, samples_per_attribute: int = 2) -> str:
  """What denoising did: removals per reason, then per attribute its count before -> after denoising
  (`counts`: {"before": ..., "after": ...} from `attribute_counts`) and a few kept samples."""
  lines = [f"generated {total} candidates, kept {len(kept)}; removed: "
           + (", ".join(f"{k} {v}" for k, v in sorted(removed.items())) or "none"),
           "attribute counts before -> after denoising:"]
  by_attribute = collections.defaultdict(list)
  for r in kept:
    for s, names in r["attributes"].items():
      for n in names:
        by_attribute[s, n].append(r["text"])
  for s, before in counts["before"].items():
    for name, n in before.items():
      samples = " | ".join(by_attribute[s, name][:samples_per_attribute])
      lines.append(f"  {s}/{name}: {n} -> {counts['after'].get(s, {}).get(name, 0)}" + (f"  {samples}" if samples else ""))
  return "\n".join(lines)


def decoding_settings(c) -> dict:
  return {"do_sample": c.do_sample, "temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p,
          "repetition_penalty": c.repetition_penalty, "num_beams": c.num_beams, "max_new_tokens": c.max_new_tokens}


def in_context_text(segment_text: str, attributes: dict, ontology, num_shot: int) -> str:
  """The no-training baseline's prompt: the instruction and attribute descriptions in words."""
  words = [ontology[s].attributes[ontology[s].index(n)].description for s, names in attributes.items() for n in names]
  return f"{instruction_text(num_shot)} {', '.join(words) or 'same thing'}: {segment_text.lstrip()}"


def validate(c) -> None:
  assembly.validate(c)
  if c.method not in ("msp", "in_context"):
    raise ConfigError(f"config.method={c.method!r}: valid: msp, in_context")
  if c.get("max_generation_rounds", 1) < 1:
    raise ConfigError(f"config.max_generation_rounds={c.max_generation_rounds}: must be >= 1")
  if c.get("max_request_values", 0) < 0:
    raise ConfigError(f"config.max_request_values={c.max_request_values}: must be >= 0 (0: all of the seed's values)")
  if c.get("balance", 0) < 0:
    raise ConfigError(f"config.balance={c.balance}: must be >= 0 (0: no balancing)")
  if c.get("requests") and c.get("balance"):
    raise ConfigError(f"config.requests={c.requests!r} and config.balance={c.balance}: choose one")
  if c.get("requests") and not os.path.isfile(c.requests):
    raise ConfigError(f"config.requests={c.requests!r}: no such file; expected one "
                              '{"attributes": {set: [names]}, "count": N} a line')
  if not 0 < c.keep_fraction <= 1 or not 0 <= c.min_value_coverage <= 1:
    raise ConfigError(f"config.keep_fraction={c.keep_fraction}, config.min_value_coverage={c.min_value_coverage}: "
                              "valid: 0 < keep_fraction <= 1, 0 <= min_value_coverage <= 1")


def prompts_fingerprint(model) -> str:
  """A hash of the trained prompt and mixer values: it changes whenever training went on."""
  _, trainable, _ = training.split(model)
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(trainable):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def candidates_made_by(c, run, step: int | None) -> dict:
  """Everything the generated candidates depend on (not gen_batch_size: resumption is per request)."""
  return {"method": c.method, "checkpoint_step": step, "prompts": prompts_fingerprint(run.model) if step is not None else None,
          "backbone": checkpoints.fingerprint(run.backbone.source), "dtype": c.dtype, "param_dtype": c.param_dtype,
          "task": [c.dataset, c.domain, c.setting], "seed": c.seed, "num_shot": c.num_shot,
          "max_mixture": c.max_mixture, "buckets": list(c.buckets), "num_generations": c.num_generations,
          "combination_fraction": c.combination_fraction, "max_seeds": c.max_seeds, "decoding": decoding_settings(c),
          # only when used, so the keys of runs made before these existed stay the same
          **({"data": data_fingerprint(run.task.splits["train"])} if c.get("data_path") else {}),
          **({"max_request_values": c.max_request_values} if c.get("max_request_values") else {}),
          **({"requests": hashlib.sha256(open(c.requests, "rb").read()).hexdigest()[:16], "max_generation_rounds": c.max_generation_rounds}
             if c.get("requests") else {}),
          **({"balance": c.balance, "max_generation_rounds": c.max_generation_rounds} if c.get("balance") else {})}


def data_fingerprint(examples) -> str:
  """A hash of the seed examples (a user's files change; the benchmarks' are checked by their builders)."""
  return provenance.stable_key([[ex.uid, ex.text, {k: list(v) for k, v in ex.attributes.items()}, list(ex.spans)]
                                for ex in examples])


def synthesize(c, backbone=None) -> dict:
  """Generates, denoises and writes labelled data for the run config `c` describes.

  Raises `files.WorkdirBusy` at once if another process holds the workdir. A missing workdir is
  not created for msp (nothing to generate from there: that is an error further on).
  """
  validate(c)  # before the lock may create the workdir: a bad config leaves nothing behind
  with files.WorkdirLock(c.workdir, create=c.method == "in_context"):
    return _synthesize(c, backbone)


def _synthesize(c, backbone) -> dict:
  started = time.perf_counter()
  run = assembly.build(c, backbone)
  step = assembly.restore_prompts(run, c.checkpoint) if c.method == "msp" else None
  tok, ontology = run.backbone.tokenizer, run.task.ontology
  seeds = list(run.task.splits["train"])[:c.max_seeds or None]
  target = c.get("synthetic_per_example", 0) * len(seeds)  # 0: one round, whatever survives
  planner = make_planner(c, seeds, ontology, target)  # a bad requests file fails here, before anything is written
  max_rounds = c.get("max_generation_rounds", 1) if target or c.get("requests") or c.get("balance") else 1
  first = planner.plan(0, [], 0)
  output = c.output or os.path.join(c.workdir, "synthetic", f"{c.method}.jsonl")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  progress_path = output + ".candidates"
  made_by = candidates_made_by(c, run, step)
  records = open_progress(progress_path, made_by)
  records = drop_torn_chunks(progress_path, records, len(first))
  done = {r["request"] for r in records}  # resume by request: a changed gen_batch_size regroups only what is left
  if done:
    print(f"resuming: {len(done)} of {len(first)} requests already generated"
          + (" (with later rounds)" if len(done) > len(first) else ""), flush=True)

  layout = msp_data.PromptLayout(ontology, run.task.splits["train"], c.num_shot)
  decoding = decoding_settings(c)
  config = sampling.DecodeConfig(max_new_tokens=c.max_new_tokens, do_sample=c.do_sample, temperature=c.temperature,
                                 top_k=c.top_k, top_p=c.top_p, repetition_penalty=c.repetition_penalty,
                                 num_beams=c.num_beams, eos_ids=(tok.eos_token_id,), pad_id=msp_data.batching.pad_id(tok),
                                 stop_ids=sampling.stop_token_ids(tok, STOP_STRINGS[:1]))  # a newline ends a row
  model = run.model
  by_slots = c.method == "msp" and mixers.widens_prefix(c.mixture)
  offset = chunk_offset = 0  # requests and chunks of the earlier rounds
  kept = []
  for round_ in range(max_rounds):
    # round r > 0: requests planned and sampled with their own seeds, indexed after the earlier rounds'
    planned = first if round_ == 0 else planner.plan(round_, kept, offset)
    prompts = {r.index: request_prompt(r, layout, c, ontology) for r in planned}
    # Chunks are cut from the requests in padding order (concat: attribute slots, then tokens): in request
    # order a CrossNER chunk was 57% real tokens, so its prefill computed almost twice the tokens it needed.
    ordered = sorted(planned, key=lambda r: msp_data.batching.padding_key(prompts[r.index], tok, run.batch_config,
                                                                           by_slots=by_slots))
    chunks = [ordered[i:i + c.gen_batch_size] for i in range(0, len(ordered), c.gen_batch_size)]
    for j in tqdm(range(len(chunks)), desc=f"generate ({c.method}, round {round_ + 1})", unit="chunk"):
      chunk = [r for r in chunks[j] if r.index not in done]
      if not chunk:
        continue
      i = chunk_offset + j  # the chunk's number over all rounds
      segments = [prompts[r.index] for r in chunk]
      padded = segments + [segments[-1]] * (c.gen_batch_size - len(segments))  # one batch shape: one compile
      batch = {k: jnp.asarray(v) for k, v in msp_data.make_batch(padded, tok, run.batch_config).items()
               if k in training.MODEL_KEYS}
      prefix, prefix_mask = model.prefix(batch) if c.method == "msp" else (None, None)
      new = sampling.generate(model.backbone, batch["input_ids"], batch["attention_mask"], config,
                              rng=request_keys(c.seed, [r.index for r in chunk], c.gen_batch_size),
                              embedded_prefix=prefix, prefix_mask=prefix_mask)
      texts = tok.batch_decode(np.asarray(new)[:len(chunk)].tolist(), skip_special_tokens=True)
      append_progress(progress_path, [dict(candidate_record(r, cut(t), s.text, c.method, decoding),
                                           chunk=[c.gen_batch_size, i], chunk_requests=len(chunk))
                                      for r, t, s in zip(chunk, texts, segments)])
    offset, chunk_offset = offset + len(planned), chunk_offset + len(chunks)
    records = sorted((r for r in read_progress(progress_path) if r["request"] < offset),
                     key=lambda r: r["request"])  # a resumed run with a lower cap ignores later rounds
    kept, removed = denoise(records, seeds, c.keep_fraction, lambda t: features.text_embeddings(run.backbone, t),
                            c.frequency_weight, c.min_value_coverage)
    missing = planner.shortfall(kept)
    if not missing:
      break
    if round_ + 1 < max_rounds:
      print(f"round {round_ + 1}: {len(kept)} kept, short of {describe_shortfall(missing)}; generating another round",
            flush=True)
  rounds = round_ + 1
  counts = {"before": attribute_counts(records), "after": attribute_counts(kept)}  # requested, then kept
  files.write_jsonl_atomic(output, [output_record(r) for r in kept])
  output_made_by = dict(made_by, keep_fraction=c.keep_fraction, frequency_weight=c.frequency_weight,
                        min_value_coverage=c.min_value_coverage,
                        **({"target": target, "max_generation_rounds": max_rounds} if target else {}))
  summary = {"output": output, "method": c.method, "checkpoint_step": step, "seeds": len(seeds),
             "seconds": round(time.perf_counter() - started, 1), "resumed": bool(done),  # this invocation's
             "candidates": len(records), "kept": len(kept), "removed": removed, "target": target, "rounds": rounds,
             "short": bool(missing), "shortfall": missing, "attribute_counts": counts, "compilations": sampling.compilations(),
             "key": provenance.stable_key(output_made_by), "made_by": output_made_by,
             **({"prompt_run": prompt_run(c.workdir)} if c.method == "msp" else {})}
  files.write_json_atomic(output + ".summary.json", summary)
  print(summarise(kept, removed, len(records), counts), flush=True)
  if missing:
    print(f"short after {rounds} round(s) (config.max_generation_rounds={max_rounds}): {describe_shortfall(missing)}",
          flush=True)
  return summary


PROMPT_RUN_FIELDS = ("seconds", "select_metric", "best", "best_step", "step")


def prompt_run(workdir: str) -> dict:
  """How the generating prompts were trained (their run's summary: seconds, dev score, steps), kept with the
  generations: a rescore on a machine that has the committed generations but not the runs still knows it."""
  trained = os.path.join(workdir, "summary.json")
  run = json.load(open(trained)) if os.path.exists(trained) else {}
  return {k: run.get(k) for k in PROMPT_RUN_FIELDS}


def request_prompt(r: requested.Request, layout, c, ontology):
  """The prompt segments of one request; its exemplars are drawn from its own seeded stream, so a prompt
  does not depend on which chunk (batch size, resume, order) it is generated in."""
  rng = np.random.default_rng([c.seed, 2, r.index])
  segments = layout.for_generation(r.attributes, r.seed.domain, rng, r.values, uid=str(r.index))
  if c.method == "in_context":
    segments = dataclasses.replace(segments, text=in_context_text(segments.text, r.attributes, ontology, c.num_shot))
  return segments


def request_keys(seed: int, indices: list[int], rows: int):
  """One sampling key per batch row: request r draws its tokens from its own stream, so its text does not
  depend on the chunk it is generated in (batch size, order, resume). Padding rows repeat the last."""
  indices = indices + indices[-1:] * (rows - len(indices))
  stream = jax.random.fold_in(jax.random.key(seed), TOKEN_STREAM)
  return jax.vmap(lambda r: jax.random.fold_in(stream, r))(jnp.asarray(indices))


def make_planner(c, seeds, ontology, target: int):
  """The requests of each round: a requests file, balancing, or the default per-seed plan."""
  if c.get("requests"):
    return requested.FromFile(requested.read_requests(c.requests, ontology, seeds), seeds, c.seed, c.keep_fraction)
  if c.get("balance"):
    return requested.Balance(seeds, c.balance, c.seed, c.keep_fraction)
  return requested.PerSeed(seeds, c.num_generations, c.combination_fraction, c.seed, target, c.get("max_request_values", 0))


def describe_shortfall(missing: dict) -> str:
  shown = ", ".join(f"{k} ({v} more)" for k, v in list(missing.items())[:5])
  return shown + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
