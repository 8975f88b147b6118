"""Settings: which examples train, dev and test a task, deterministically from a seed.

`load_task(dataset, domain, setting, seed=...)` gives a `Task`: the three splits as `Example`s and
the ontology. The settings (the MSP paper's, with the original's split bugs fixed):

NLU++ (20 folds per domain, no official split; folds are shuffled by the seed, `order`):
  few_shot  train = target folds order[0:2] (~10%), dev = order[2], test = order[3:20]
  full      train = order[0:16], dev = order[16:18], test = order[18:20]
  cross     train = all 20 folds of the other domain; dev = target order[0:2], test = target
            order[2:20], both labelled with the target's general intents only
  Dev and test folds never overlap (the original's test was a copy of dev).
CrossNER:
  full      the domain's train/dev/test (100-200 training sentences)
  few_shot  sentences of the domain's train split, in seeded random order, kept while they add a
            mention of an entity type that has fewer than `min_mentions` (50, as the paper); dev/test
            as in full
  cross     train = conll2003 train; dev/test = the domain's, labelled with the CoNLL types only
TOPv2:
  full      train / eval (as dev) / test
  few_shot  low_resource_splits train_<spis>spis / valid_<spis>spis (as dev) / full test (reminder,
            weather; spis=25 as the paper)
  cross     train = the train splits of the six non-target domains; dev/test = the domain's
            eval/test, labelled with its general intents and slots only
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from msp_jax.data import crossner, nlupp, topv2, user_files
from msp_jax.data import sources
from msp_jax.data.example import Example
from msp_jax.data.ontology import Ontology, merge
from msp_jax.data.sources import DataError

SETTINGS = ("few_shot", "full", "cross")
_DATASETS = {"nlupp": nlupp, "crossner": crossner, "topv2": topv2}
_BUILDERS = {"nlupp": nlupp.Nlupp, "crossner": crossner.Crossner, "topv2": topv2.Topv2}
DATASETS = (*_DATASETS, user_files.DATASET)
CROSSNER_SOURCE = "conll2003"
DEV_SHARE = 0.1  # of a files dataset's train examples held out as dev when it has no dev file


@dataclasses.dataclass(frozen=True)
class Task:
  """One dataset/domain/setting: the splits as Examples, the ontology, and where each split came from."""
  dataset: str
  domain: str
  setting: str
  seed: int
  ontology: Ontology
  splits: Mapping[str, tuple[Example, ...]]   # "train", "dev", "test"
  provenance: Mapping[str, str]               # split -> e.g. "banking folds 3, 17"


def domains(dataset: str) -> tuple[str, ...]:
  """The benchmark's domains (config names); () for a files dataset, whose rows name their domains."""
  if dataset == user_files.DATASET:
    return ()
  if dataset not in _DATASETS:
    raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
  return _DATASETS[dataset].DOMAINS


class _Reader:
  """Prepares builders on first use and turns their records into Examples."""

  def __init__(self, dataset: str, data_dir: str | None, download: bool):
    self.dataset, self.data_dir, self.download = dataset, data_dir, download
    self._builders = {}

  def builder(self, domain: str):
    if domain not in self._builders:
      self._builders[domain] = sources.prepared(_BUILDERS[self.dataset], domain, data_dir=self.data_dir,
                                                download=self.download)
    return self._builders[domain]

  def records(self, domain: str, split: str) -> list[dict]:
    return sources.read_split(self.builder(domain), split)

  def examples(self, domain: str, split: str, records: list[dict] | None = None) -> list[Example]:
    to_example = _DATASETS[self.dataset].to_example
    records = self.records(domain, split) if records is None else records
    return [to_example(r, f"{domain}/{split}/{i}", domain) for i, r in enumerate(records)]

  def ontology(self, domain: str) -> Ontology:
    return Ontology.from_metadata(self.dataset, self.builder(domain).info.metadata, domains(self.dataset))


def load_task(dataset: str, domain: str, setting: str = "few_shot", *, seed: int = 0, data_dir: str | None = None,
              download: bool = False, min_mentions: int = 50, spis: int = 25, data_path: str | None = None) -> Task:
  """The train/dev/test Examples and ontology of one dataset, domain and setting.

  data_dir: where TFDS keeps prepared datasets (default ~/tensorflow_datasets); raw files come from
  $MSP_DATA_DIR or the TFDS manual_dir, or from the internet with download=True. Dataset "files" reads
  the folder `data_path` instead (user_files.py); its domain argument is ignored (rows name theirs).
  """
  if dataset == user_files.DATASET:
    return _files(data_path, setting, seed, data_dir)
  if domain not in domains(dataset):
    raise DataError(f"{dataset}: unknown domain {domain!r}; valid: {', '.join(domains(dataset))}")
  if setting not in SETTINGS:
    raise DataError(f"unknown setting {setting!r}; valid: {', '.join(SETTINGS)}")
  reader = _Reader(dataset, data_dir, download)
  build: Callable = {"nlupp": _nlupp, "crossner": _crossner, "topv2": _topv2}[dataset]
  ontology, splits, provenance = build(reader, domain, setting, seed, min_mentions=min_mentions, spis=spis)
  return Task(dataset, domain, setting, seed, ontology, {k: tuple(v) for k, v in splits.items()}, provenance)


def _files(data_path: str | None, setting: str, seed: int, data_dir: str | None) -> Task:
  """A data folder's splits as given; without a dev file a seeded DEV_SHARE of train (at least one
  example, in file order) is dev. Settings few_shot and full both mean the files as they are."""
  if not data_path:
    raise DataError("dataset 'files' needs config.data_path: a folder with train.jsonl or train.txt")
  if setting not in ("few_shot", "full"):
    raise DataError(f"files: setting {setting!r} needs several domains' benchmarks; valid: few_shot, full "
                    "(both use the files as they are)")
  builder = user_files.prepared(data_path, data_dir)
  folder = user_files.read_folder(data_path)
  examples = lambda split: [user_files.to_example(r, f"{split}/{i}", "") for i, r in
                            enumerate(sources.read_split(builder, split))]
  splits = {split: examples(split) for split in folder.files}
  provenance = {split: f"{folder.path / name} ({len(splits[split])} examples)" for split, name in folder.files.items()}
  if "dev" not in splits:
    train = splits["train"]
    if len(train) < 2:
      raise DataError(f"{folder.path / folder.files['train']}: 1 example; a dev share needs 2 or more, or a dev file")
    n_dev = max(1, int(round(DEV_SHARE * len(train))))
    held = set(np.random.default_rng(seed).permutation(len(train))[:n_dev].tolist())
    splits["dev"] = [ex for i, ex in enumerate(train) if i in held]
    splits["train"] = [ex for i, ex in enumerate(train) if i not in held]
    provenance["dev"] = f"{n_dev} of {len(train)} examples of {folder.path / folder.files['train']} (seed {seed})"
    provenance["train"] = f"the other {len(train) - n_dev}"
  splits.setdefault("test", [])
  provenance.setdefault("test", "none (no test file)")
  ontology = Ontology.from_metadata(user_files.DATASET, builder.info.metadata, builder.info.metadata["domains"])
  return Task(user_files.DATASET, folder.domains[0], setting, seed, ontology,
              {k: tuple(v) for k, v in splits.items()}, provenance)


def nlupp_folds(setting: str, seed: int) -> dict[str, list[int]]:
  """The target domain's folds per split (see the module docstring); cross trains on the other domain."""
  order = [int(f) for f in np.random.default_rng(seed).permutation(nlupp.NUM_FOLDS)]
  return {"few_shot": {"train": order[:2], "dev": order[2:3], "test": order[3:]},
          "full": {"train": order[:16], "dev": order[16:18], "test": order[18:]},
          "cross": {"dev": order[:2], "test": order[2:]}}[setting]


def _nlupp(reader: _Reader, domain, setting, seed, **_):
  folds = nlupp_folds(setting, seed)
  fold_examples = lambda d, fs: [ex for f in fs for ex in reader.examples(d, f"fold{f}")]
  splits = {name: fold_examples(domain, fs) for name, fs in folds.items()}
  provenance = {name: f"{domain} folds {', '.join(map(str, sorted(fs)))}" for name, fs in folds.items()}
  ontology = reader.ontology(domain)
  if setting == "cross":
    (source,) = [d for d in nlupp.DOMAINS if d != domain]
    splits["train"] = fold_examples(source, range(nlupp.NUM_FOLDS))
    provenance["train"] = f"{source} folds 0-{nlupp.NUM_FOLDS - 1}"
    ontology = _cross(reader.ontology(source), ontology, splits, provenance)
  return ontology, splits, provenance


def _crossner(reader: _Reader, domain, setting, seed, *, min_mentions, **_):
  splits = {"train": reader.examples(domain, "train"), "dev": reader.examples(domain, "dev"),
            "test": reader.examples(domain, "test")}
  provenance = {s: f"{domain} {s}" for s in splits}
  ontology = reader.ontology(domain)
  if setting == "few_shot":
    records = reader.records(domain, "train")
    keep = greedy_mentions([[e["type"] for e in sources.rows(r["entities"])] for r in records], min_mentions, seed)
    splits["train"] = [splits["train"][i] for i in keep]
    provenance["train"] = f"{len(keep)} of {len(records)} {domain} train sentences (>= {min_mentions} mentions per type where possible)"
  elif setting == "cross":
    if domain == CROSSNER_SOURCE:
      raise DataError(f"crossner: setting 'cross' trains on {CROSSNER_SOURCE}; pick another target domain: "
                      f"{', '.join(d for d in crossner.DOMAINS if d != CROSSNER_SOURCE)}")
    splits["train"] = reader.examples(CROSSNER_SOURCE, "train")
    provenance["train"] = f"{CROSSNER_SOURCE} train"
    ontology = _cross(reader.ontology(CROSSNER_SOURCE), ontology, splits, provenance)
  return ontology, splits, provenance


def _topv2(reader: _Reader, domain, setting, seed, *, spis, **_):
  if setting == "few_shot":
    if domain not in topv2.LOW_RESOURCE_DOMAINS or spis not in topv2.SPIS:
      raise DataError(f"topv2: few_shot needs low-resource files; valid domains: {', '.join(topv2.LOW_RESOURCE_DOMAINS)}, "
                      f"valid spis: {', '.join(map(str, topv2.SPIS))} (got {domain!r}, {spis})")
    names = {"train": f"train_{spis}spis", "dev": f"valid_{spis}spis", "test": "test"}
  else:
    names = {"train": "train", "dev": "eval", "test": "test"}
  splits = {s: reader.examples(domain, name) for s, name in names.items()}
  provenance = {s: f"{domain} {name}" for s, name in names.items()}
  ontology = reader.ontology(domain)
  if setting == "cross":
    sources_ = [d for d in topv2.DOMAINS if d not in topv2.LOW_RESOURCE_DOMAINS and d != domain]
    splits["train"] = [ex for d in sources_ for ex in reader.examples(d, "train")]
    provenance["train"] = f"train of {', '.join(sources_)}"
    ontology = _cross(merge([reader.ontology(d) for d in sources_]), ontology, splits, provenance)
  return ontology, splits, provenance


def _cross(source: Ontology, target: Ontology, splits: dict, provenance: dict) -> Ontology:
  """Relabels dev/test with the target's general attributes; the source's plus those are the vocabulary."""
  general = target.only_general()
  allowed = {s.name: frozenset(s.names) for s in general.sets}
  for split in ("dev", "test"):
    splits[split] = [ex.restricted(allowed) for ex in splits[split]]
    provenance[split] += " (general attributes only)"
  return merge([source, general])


def seeded_sample(items: Sequence, n: int, seed) -> list:
  """n of `items` drawn without replacement by `np.random.default_rng(seed)`, kept in their original order;
  all of them when there are n or fewer. `seed` is anything numpy seeds from (an int, or a list that
  gives each use its own stream)."""
  if len(items) <= n:
    return list(items)
  return [items[i] for i in sorted(np.random.default_rng(seed).choice(len(items), n, replace=False))]


def greedy_mentions(mention_types: Sequence[Sequence[str]], min_mentions: int, seed: int) -> list[int]:
  """Indices (sorted) of sentences kept, visiting them in seeded random order, while a sentence adds a
  mention of a type still under `min_mentions`; stops once every type present has enough."""
  counts, keep = collections.Counter(), []
  needed = {t for types in mention_types for t in types}
  for i in np.random.default_rng(seed).permutation(len(mention_types)):
    if not needed:
      break
    types = mention_types[i]
    if any(t in needed for t in types):
      keep.append(int(i))
      counts.update(types)
      needed -= {t for t in types if counts[t] >= min_mentions}
  return sorted(keep)
