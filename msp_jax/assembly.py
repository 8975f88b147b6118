"""Run assembly: backbone, task, prompts, batch layout and mesh from a config, and trained prompts
read back into them. `train.py`, `generate.py`, `evaluate.py` and `export` build a run the same way.

`build(c)` validates the config first (nothing is loaded or written for a bad one), then loads the
backbone (unless given), prepares the task's data and initialises the prompts and mixer;
`restore_prompts(run)` reads a workdir's trained prompts into it after checking that its metadata
names the same backbone and vocabulary. The training loop itself is `trainer.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from msp_jax import capacity, sharding, training
from msp_jax import checkpoints as ckpt
from msp_jax import data as msp_data
from msp_jax import prompts as soft_prompts
from msp_jax.errors import MspError
from msp_jax.models.weights import Backbone, load_backbone


class ConfigError(MspError):
  """A config value that cannot work; the message names the field and the valid values."""


def validate(c, backbone: Backbone | None = None) -> None:
  """Refuses a config that cannot work, before anything is loaded or written. Without a loaded
  `backbone`, the prompt layout and one step's memory are checked against `c.model`'s header."""
  def fail(field, why):
    raise ConfigError(f"config.{field}={getattr(c, field)!r}: {why}")
  if c.mixture not in soft_prompts.MIXTURES:
    fail("mixture", f"valid: {', '.join(soft_prompts.MIXTURES)}")
  if c.dataset not in msp_data.DATASETS:
    fail("dataset", f"valid: {', '.join(msp_data.DATASETS)}")
  if c.dataset == "files":  # the user's folder: every line checked now, before anything is written
    if not c.get("data_path"):
      fail("data_path", "a folder with train.jsonl (or train.txt) is needed with dataset=files")
    msp_data.user_files.read_folder(c.data_path)
  elif c.get("data_path"):
    fail("data_path", f"is read with --config.dataset=files only (dataset is {c.dataset!r})")
  elif c.domain not in msp_data.domains(c.dataset):
    fail("domain", f"valid for {c.dataset}: {', '.join(msp_data.domains(c.dataset))}")
  if c.setting not in msp_data.SETTINGS:
    fail("setting", f"valid: {', '.join(msp_data.SETTINGS)}")
  for field in ("max_steps", "num_epochs", "n_tokens", "patience", "bleu_examples", "eval_batches", "eval_every"):
    if getattr(c, field) < 0:
      fail(field, "must be >= 0")
  if not 0 <= c.get("warmup_fraction", 0.0) < 1:
    fail("warmup_fraction", "the share of all steps spent warming up: valid 0 <= warmup_fraction < 1 (0: warmup_steps)")
  for field in ("batch_size", "grad_accum_steps", "checkpoint_every", "attribute_tokens",
                "max_new_tokens", "keep_best", "log_every"):
    if getattr(c, field) < 1:
      fail(field, "must be >= 1")
  if c.max_steps == 0 and c.num_epochs == 0:
    fail("max_steps", "and num_epochs are both 0: set one")
  if c.select_metric not in ("dev_loss", "dev_bleu"):
    fail("select_metric", "valid: dev_loss, dev_bleu")
  if c.select_metric == "dev_bleu" and c.bleu_examples == 0:
    fail("bleu_examples", "must be > 0 when select_metric is dev_bleu")
  if not (math.isfinite(c.learning_rate) and c.learning_rate > 0):
    fail("learning_rate", "must be a finite number > 0")
  if c.optimizer not in ("adamw", "adafactor"):
    fail("optimizer", "valid: adamw, adafactor")
  if c.decay not in ("cosine", "constant"):
    fail("decay", "valid: cosine, constant")
  for field in ("dtype", "param_dtype"):
    if getattr(c, field) not in ("", "float32", "bfloat16", "float16"):
      fail(field, "valid: float32, bfloat16, float16, or '' (fp32 on CPU, bf16 on accelerators)")
  if not c.buckets or min(c.buckets) < 1:
    fail("buckets", "must be one or more padded lengths >= 1")
  if backbone is None:
    capacity.check_fits(c, fail)




@dataclasses.dataclass
class Run:
  """Everything a run is built from; `generate.py` rebuilds the same from a workdir."""
  config: Any
  backbone: Backbone
  task: Any
  model: training.PromptedModel
  batch_config: msp_data.BatchConfig
  mesh: Mesh                     # (data, model) devices the step runs on; every process builds the same


def embedding_table(model) -> np.ndarray:
  """The backbone's input embedding matrix [V, D] (prompts are initialised from its rows)."""
  table = getattr(model, "embed", None)
  table = table if table is not None else model.shared
  return np.asarray(table[...], np.float32)


def say(text: str) -> None:
  """A start-up or end message, from process 0 only."""
  if jax.process_index() == 0:
    print(text, flush=True)


@contextlib.contextmanager
def announce(what: str):
  """`what ...` before a slow start-up stage and its seconds after, so a long start is not silent."""
  start = time.perf_counter()
  say(f"{what} ...")
  yield
  say(f"{what}: done in {time.perf_counter() - start:.1f} s")


def build(c, backbone: Backbone | None = None) -> Run:
  """Backbone, task and freshly initialised prompts for config `c`."""
  validate(c, backbone)
  if backbone is None:
    with announce(f"loading backbone {c.model}"):
      backbone = load_backbone(c.model, dtype=c.dtype or None, param_dtype=c.param_dtype or None)
  if backbone.tokenizer is None:
    raise ConfigError(f"config.model={c.model!r}: the checkpoint has no tokenizer files")
  with announce(f"preparing data {c.get('data_path') or c.dataset + '/' + c.domain} {c.setting}"):
    # data_seed (the experiment grid) fixes the split while `seed` varies training and sampling
    task = msp_data.load_task(c.dataset, c.domain, c.setting, seed=c.get("data_seed", c.seed), data_dir=c.data_dir or None,
                              data_path=c.get("data_path") or None)
  model = training.PromptedModel(backbone.model, make_prompts(c, task.ontology, backbone),
                                 encoder_decoder=backbone.is_encoder_decoder)
  batch_config = msp_data.BatchConfig(buckets=tuple(c.buckets), max_mixture=c.max_mixture,
                                      encoder_decoder=backbone.is_encoder_decoder)
  return Run(c, backbone, task, model, batch_config, sharding.make_mesh(c.model_parallel))


def make_prompts(c, ontology, backbone: Backbone) -> soft_prompts.SoftPrompts:
  """Freshly initialised prompts and mixer for config `c` and the attribute sets of `ontology`."""
  table, tok = embedding_table(backbone.model), backbone.tokenizer
  instruction = soft_prompts.init_instruction(c.instruction_init, c.n_tokens, table, tok,
                                              text=soft_prompts.instruction_text(c.num_shot), seed=c.seed)
  banks = {s.name: soft_prompts.init_bank(s.descriptions, table, tok, c.attribute_tokens) for s in ontology.sets}
  return soft_prompts.SoftPrompts(instruction, banks, c.mixture, rngs=nnx.Rngs(c.seed), temperature=c.mixer_temperature,
                                  hidden=c.bottleneck_size, kernel_size=c.cnn_kernel)


def metadata(run: Run) -> dict:
  c = run.config
  tok = run.backbone.tokenizer
  return {
      "backbone": c.model, "backbone_source": run.backbone.source, "backbone_model_type": run.backbone.model_type,
      "backbone_fingerprint": ckpt.fingerprint(run.backbone.source),
      "tokenizer": {"class": type(tok).__name__, "vocab_size": len(tok), "eos_token": tok.eos_token},
      "attributes": {s.name: list(s.names) for s in run.task.ontology.sets},
      "ontology": run.task.ontology.to_json(),
      "mixture": c.mixture, "n_tokens": c.n_tokens, "attribute_tokens": c.attribute_tokens,
      "splits": {k: len(v) for k, v in run.task.splits.items()}, "provenance": dict(run.task.provenance),
      "config": c.to_dict(),
  }




def checkpoint_store(c) -> ckpt.Checkpoints:
  return ckpt.Checkpoints(c.workdir, metric=c.select_metric, minimize=c.select_metric == "dev_loss",
                          keep_best=c.keep_best)


def restore_prompts(run: Run, which="best") -> int:
  """Loads trained prompts and mixer from `run.config.workdir` into `run.model`; returns the step.

  `which` is "best", "latest" or a step number. The workdir's metadata must name this backbone. A
  step that does not read back is an error naming it and the intact steps, even for "best" and
  "latest": generation never silently uses other prompts than the ones asked for.
  """
  c = run.config
  folder = os.path.join(c.workdir, "checkpoints")
  if ckpt.read_metadata(c.workdir) is None:
    saved = sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []
    if saved:
      raise ckpt.CheckpointError(f"{os.path.join(c.workdir, ckpt.METADATA)} is missing, though {folder} holds steps "
                                 f"{saved}; train.py writes it at start: re-run train.py with this run's config and "
                                 "workdir (it resumes from the latest step) to rewrite it")
    raise ConfigError(f"config.workdir={c.workdir!r}: no trained checkpoint there; run train.py first "
                      "or use --config.method=in_context")
  ckpt.check_metadata(c.workdir, metadata(run))
  return restore_trainable(c, run.model, which)


def restore_trainable(c, model, which="best") -> int:
  """Loads step `which` of `c.workdir`'s checkpoints into `model`'s prompts and mixer; returns the step.
  Reads the prompts alone: no optimizer is built and its state is not read."""
  which = str(which)
  if which not in ("best", "latest") and not which.isdigit():
    raise ConfigError(f"config.checkpoint={which!r}: valid: best, latest or a step number")
  store = checkpoint_store(c)
  try:
    steps = store.steps()
    if not steps:
      raise ConfigError(f"config.workdir={c.workdir!r}: no trained checkpoint there; run train.py first "
                        "or use --config.method=in_context")
    step = store.best_step() if which == "best" else store.latest_step() if which == "latest" else int(which)
    if step not in steps:
      raise ConfigError(f"config.checkpoint={which!r}: no such step in {c.workdir}; kept steps: {steps}")
    _, trainable, _ = training.split(model)
    where = jax.tree.leaves(trainable)[0].sharding  # generation runs where the model already is
    target = {"trainable": ckpt.abstract(trainable, where)}
    try:
      state = store.restore_part(step, target)
    except ckpt.CheckpointError as e:
      raise ckpt.CheckpointError(f"{e}; intact steps: {store.intact_steps(target) or 'none'}; pick one with "
                                 "--config.checkpoint=STEP") from None
  finally:
    store.close()
  nnx.update(model, state["trainable"])
  return step
