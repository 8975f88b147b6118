"""Attribute-controlled synthesis: requests -> prompts -> sampled candidates -> denoised, labelled JSONL.

1. Requests: for each seed (training) example, `num_generations` attribute sets: mostly the seed's
   own, and a configurable fraction of new combinations drawn from the attributes' observed
   co-occurrence (so sets never seen together in the seed data appear too).
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
Progress is appended to `candidates.jsonl` after every chunk, so an interrupted run resumes; the
output file is written atomically at the end.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Callable, Sequence

import numpy as np

from msp_jax.data.example import Example

STOP_STRINGS = ("\n", "...")


@dataclasses.dataclass(frozen=True)
class Request:
  index: int
  seed: Example
  attributes: dict            # set name -> sorted tuple of attribute names
  typed_values: tuple         # (type, value) pairs the text must contain (CrossNER/TOPv2)
  values: tuple               # what the prompt shows
  kind: str                   # "seed" | "combination"


def cooccurrence(seeds: Sequence[Example]) -> dict:
  """(set, name) -> set of keys seen in the same example."""
  graph = collections.defaultdict(set)
  for ex in seeds:
    keys = ex.keys()
    for k in keys:
      graph[k] |= keys - {k}
  return graph


def plan_requests(seeds: Sequence[Example], num_generations: int, combination_fraction: float,
                  rng: np.random.Generator) -> list[Request]:
  """`num_generations` requests per seed, deterministic given rng."""
  graph = cooccurrence(seeds)
  values_of = collections.defaultdict(list)  # type -> values seen with it, for new combinations
  for ex in seeds:
    for t, v in ex.typed_values:
      values_of[t].append(v)
  requests = []
  for seed in seeds:
    for _ in range(num_generations):
      keys = set(seed.keys())
      kind = "seed"
      if keys and rng.random() < combination_fraction:
        anchor = sorted(keys)[rng.integers(len(keys))]
        partners = sorted(graph[anchor] - keys)
        if partners:
          kind = "combination"
          added = partners[rng.integers(len(partners))]
          others = sorted(keys - {anchor})
          if others and rng.random() < 0.5:  # swap one attribute out as well: an unseen set is likelier
            keys.discard(others[rng.integers(len(others))])
          keys.add(added)
      attributes = {s: tuple(sorted(n for (ks, n) in keys if ks == s)) for s in seed.attributes}
      types = {n for _, n in keys}
      typed = [(t, v) for t, v in seed.typed_values if t in types]
      for t in sorted(types - {t for t, _ in typed}):
        if values_of.get(t):
          typed.append((t, values_of[t][rng.integers(len(values_of[t]))]))
      values = tuple(v for _, v in typed) if seed.typed_values else seed.values
      requests.append(Request(len(requests), seed, attributes, tuple(typed), values, kind))
  return requests


def cut(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
  """The generation up to its first stop string, stripped of a leading list number ("2) ") that the
  model copies from the exemplar list."""
  for stop in stop_strings:
    if stop in text:
      text = text[:text.index(stop)]
  return re.sub(r"^\s*\d+\)\s*", "", text).strip()


def found_spans(text: str, typed_values: Sequence[tuple[str, str]]) -> list[dict]:
  """Character spans of the (type, value) pairs that occur in text (case-insensitive, whole words)."""
  spans = []
  for t, value in typed_values:
    m = re.search(r"(?<!\w)" + re.escape(value) + r"(?!\w)", text, flags=re.IGNORECASE)
    if m is not None:
      spans.append({"type": t, "value": text[m.start():m.end()], "start": m.start(), "end": m.end()})
  return spans


def find_spans(text: str, typed_values: Sequence[tuple[str, str]]) -> list[dict] | None:
  """Spans of every (type, value) in text; None if one is missing."""
  spans = found_spans(text, typed_values)
  return spans if len(spans) == len(typed_values) else None


def label_found_values(c: dict) -> float:
  """Sets a candidate's spans to the requested values found in its text and drops requested types with
  none found from its attributes; returns the share of requested values found (1.0 if none requested)."""
  typed = [tuple(tv) for tv in c["typed_values"]]
  c["spans"] = found_spans(c["text"], typed)
  missing = {t for t, _ in typed} - {s["type"] for s in c["spans"]}
  c["attributes"] = {k: [n for n in names if n not in missing] for k, names in c["attributes"].items()}
  return len(c["spans"]) / len(typed) if typed else 1.0


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


def candidate_record(request: Request, text: str, prompt_text: str, method: str, decoding: dict) -> dict:
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
  """Candidates already generated; a torn last line (killed mid-write) is dropped and the file mended."""
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
  return records


def append_progress(path: str, records: list[dict]) -> None:
  with open(path, "a") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_jsonl_atomic(path: str, records: list[dict]) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


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
  from msp_jax.prompts import instruction_text
  words = [ontology[s].attributes[ontology[s].index(n)].description for s, names in attributes.items() for n in names]
  return f"{instruction_text(num_shot)} {', '.join(words) or 'same thing'}: {segment_text.lstrip()}"


def synthesize(c, backbone=None) -> dict:
  """Generates, denoises and writes labelled data for the run config `c` describes."""
  import jax
  import jax.numpy as jnp
  from msp_jax import data as msp_data, features, sampling, trainer
  from msp_jax.trainer import ConfigError

  if c.method not in ("msp", "in_context"):
    raise ConfigError(f"config.method={c.method!r}: valid: msp, in_context")
  if not 0 < c.keep_fraction <= 1 or not 0 <= c.min_value_coverage <= 1:
    raise ConfigError(f"config.keep_fraction={c.keep_fraction}, config.min_value_coverage={c.min_value_coverage}: "
                      "valid: 0 < keep_fraction <= 1, 0 <= min_value_coverage <= 1")
  run = trainer.build(c, backbone)
  step = trainer.restore_prompts(run, c.checkpoint) if c.method == "msp" else None
  tok, ontology = run.backbone.tokenizer, run.task.ontology
  seeds = list(run.task.splits["train"])[:c.max_seeds or None]
  requests = plan_requests(seeds, c.num_generations, c.combination_fraction, np.random.default_rng([c.seed, 1]))
  output = c.output or os.path.join(c.workdir, "synthetic", f"{c.method}.jsonl")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  progress_path = output + ".candidates"
  chunks = [requests[i:i + c.gen_batch_size] for i in range(0, len(requests), c.gen_batch_size)]
  done = collections.Counter()
  records = read_progress(progress_path)
  for r in records:
    done[r["request"] // c.gen_batch_size] += 1
  complete = {i for i, n in done.items() if n == len(chunks[i])}
  if len(complete) != len(done):  # a chunk cut short by a kill: redo it whole
    records = [r for r in records if r["request"] // c.gen_batch_size in complete]
    write_jsonl_atomic(progress_path, records)
  if complete:
    print(f"resuming: {len(complete)} of {len(chunks)} chunks already generated", flush=True)

  layout = msp_data.PromptLayout(ontology, run.task.splits["train"], c.num_shot)
  decoding = decoding_settings(c)
  config = sampling.DecodeConfig(max_new_tokens=c.max_new_tokens, do_sample=c.do_sample, temperature=c.temperature,
                                 top_k=c.top_k, top_p=c.top_p, repetition_penalty=c.repetition_penalty,
                                 num_beams=c.num_beams, eos_ids=(tok.eos_token_id,), pad_id=msp_data.batching.pad_id(tok),
                                 stop_ids=sampling.stop_token_ids(tok, STOP_STRINGS[:1]))  # a newline ends a row
  model = run.model
  from tqdm import tqdm
  for i in tqdm(range(len(chunks)), desc=f"generate ({c.method})", unit="chunk"):
    if i in complete:
      continue
    chunk = chunks[i]
    rng = np.random.default_rng([c.seed, 2, i])
    segments = [layout.for_generation(r.attributes, r.seed.domain, rng, r.values, uid=str(r.index)) for r in chunk]
    if c.method == "in_context":
      segments = [dataclasses.replace(s, text=in_context_text(s.text, r.attributes, ontology, c.num_shot))
                  for s, r in zip(segments, chunk)]
    padded = segments + [segments[-1]] * (c.gen_batch_size - len(segments))  # one batch shape: one compile
    batch = {k: jnp.asarray(v) for k, v in msp_data.make_batch(padded, tok, run.batch_config).items()
             if k in trainer.MODEL_KEYS}
    prefix, prefix_mask = model.prefix(batch) if c.method == "msp" else (None, None)
    new = sampling.generate(model.backbone, batch["input_ids"], batch["attention_mask"], config,
                            rng=jax.random.fold_in(jax.random.key(c.seed), i), embedded_prefix=prefix,
                            prefix_mask=prefix_mask)
    texts = tok.batch_decode(np.asarray(new)[:len(chunk)].tolist(), skip_special_tokens=True)
    append_progress(progress_path, [candidate_record(r, cut(t), s.text, c.method, decoding)
                                    for r, t, s in zip(chunk, texts, segments)])
  records = read_progress(progress_path)
  for r in records:  # progress files written before candidates stored their typed values
    r.setdefault("typed_values", [list(tv) for tv in requests[r["request"]].typed_values])
  before = attribute_counts(records)  # requested attributes, before denoising drops or relabels any
  kept, removed = denoise(records, seeds, c.keep_fraction, lambda t: features.text_embeddings(run.backbone, t),
                          c.frequency_weight, c.min_value_coverage)
  counts = {"before": before, "after": attribute_counts(kept)}
  write_jsonl_atomic(output, [output_record(r) for r in kept])
  summary = {"output": output, "method": c.method, "checkpoint_step": step, "seeds": len(seeds),
             "candidates": len(records), "kept": len(kept), "removed": removed, "attribute_counts": counts,
             "compilations": sampling.compilations()}
  with open(output + ".summary.json", "w") as f:
    json.dump(summary, f, indent=1)
  print(summarise(kept, removed, len(records), counts), flush=True)
  return summary
