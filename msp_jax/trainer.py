"""The training loop behind `train.py`: build, train, evaluate, select, checkpoint, resume.

`train(config)` is what tests call; `train.py` only parses flags. Re-running with the same
workdir resumes from the latest checkpoint (prompts, optimizer, step, data position), so a killed
run ends with the prompts an uninterrupted one would have. One process writes a workdir at a time
(`files.WorkdirLock`); Ctrl-C stops after the current step with a checkpoint (`interrupts`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msp_jax import checkpoints as ckpt
from msp_jax import data as msp_data
from msp_jax import config_keys, files, interrupts, mixers, provenance, sampling, sharding, training
from msp_jax.assembly import Run, announce, build, checkpoint_store, metadata, say, validate
from msp_jax.errors import MspError
from msp_jax.metrics import text_quality
from msp_jax.models.weights import Backbone


def model_batch(batch: dict, mesh) -> dict:
  """The arrays the model reads, with padding rows (example_mask False) out of the loss, on devices."""
  arrays = {k: v for k, v in batch.items() if k in training.MODEL_KEYS}
  arrays["loss_mask"] = arrays["loss_mask"] & batch["example_mask"][:, None]
  return sharding.global_batch(arrays, mesh)


def padding_shares(batch: dict) -> dict:
  """How much of a batch is padding: token positions [B, T] and attribute slots [B, S, M] (the
  concat mixer computes a prefix token for every slot, masked or not)."""
  return {"pad_tokens": 1 - float(batch["attention_mask"].mean()),
          "pad_attribute_slots": 1 - float(batch["attribute_mask"].mean())}


class RunLog:
  """metrics.jsonl (one strict JSON object per line: NaN/inf as null) and TensorBoard event files,
  from process 0 only.

  A run resumed at step N logs steps N+1.. again, so what an earlier run logged from `first_step`
  (N+1; 0 for a fresh start) on is dropped: metrics.jsonl is cut there (atomically) and TensorBoard
  is told to hide earlier events from that step on (`purge_step`).
  """

  def __init__(self, workdir: str, first_step: int = 0):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter
      path = os.path.join(workdir, "metrics.jsonl")
      trim_metrics(path, first_step)
      self.file = open(path, "a")
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=first_step)

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    self.file.write(files.strict_json({"step": step, **values}) + "\n")
    self.file.flush()
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()  # else a killed run loses up to two minutes of curve (tensorboardX flushes every 120 s)

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      self.tb.close()


def trim_metrics(path: str, first_step: int) -> None:
  """Drops the lines of `path` from `first_step` on, and a torn last line (a kill mid-write)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] >= first_step:
        break
    except (ValueError, KeyError, TypeError):
      break
    kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    files.write_text_atomic(path, "".join(kept))


def evaluate(run: Run, graphdef, trainable, frozen, eval_step, mesh) -> dict:
  """Dev loss / perplexity over dev batches, and BLEU of greedy generations against dev utterances."""
  c, tok = run.config, run.backbone.tokenizer
  dev = msp_data.task_batches(run.task, "dev", tok, global_batch_size=c.batch_size, config=run.batch_config,
                              seed=c.seed, num_exemplars=c.num_shot)
  nll = count = 0.0
  for i, batch in enumerate(dev):
    if c.eval_batches and i >= c.eval_batches:
      break
    s, n = eval_step(trainable, frozen, model_batch(batch, mesh))
    nll, count = nll + float(s), count + float(n)
  out = {"dev_loss": nll / max(count, 1), "dev_tokens": count}
  out["dev_perplexity"] = math.exp(min(out["dev_loss"], 50))
  if c.bleu_examples:
    out["dev_bleu"] = dev_bleu(run, graphdef, trainable, frozen, mesh)
  return out


def dev_bleu(run: Run, graphdef, trainable, frozen, mesh) -> float:
  c, tok = run.config, run.backbone.tokenizer
  examples = run.task.splits["dev"][:c.bleu_examples]
  layout = msp_data.PromptLayout(run.task.ontology, run.task.splits["train"], c.num_shot)
  model = nnx.merge(graphdef, trainable, frozen)
  hyps = []
  for start in range(0, len(examples), c.batch_size):
    chunk = examples[start:start + c.batch_size]
    segments = [layout.segments(ex, np.random.default_rng([c.seed, start + i]), with_target=False)
                for i, ex in enumerate(chunk)]
    batch = msp_data.make_batch(segments, tok, run.batch_config)
    batch["loss_mask"] = np.zeros_like(batch["attention_mask"])
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if k in training.MODEL_KEYS}
    prefix, prefix_mask = model.prefix(arrays)
    new = sampling.greedy(model.backbone, arrays["input_ids"], arrays["attention_mask"],
                          max_new_tokens=c.max_new_tokens, eos_id=tok.eos_token_id,
                          pad_id=msp_data.batching.pad_id(tok), embedded_prefix=prefix, prefix_mask=prefix_mask)
    hyps += [text.split("\n")[0].strip() for text in tok.batch_decode(np.asarray(new).tolist(), skip_special_tokens=True)]
  return text_quality.corpus_bleu(hyps, [[ex.text] for ex in examples])


def warmup_steps(c, total_steps: int) -> int:
  """`warmup_fraction` of all steps when set (the original's schedule scales with the run), else `warmup_steps`."""
  return round(c.warmup_fraction * total_steps) if c.get("warmup_fraction", 0.0) else c.warmup_steps


def eval_interval(c, steps_per_epoch: int) -> int:
  """Optimizer steps between dev evaluations: `eval_every`, or once an epoch when it is 0."""
  return c.eval_every or max(1, steps_per_epoch // c.grad_accum_steps)


def make_tx(c, total_steps: int):
  return training.make_optimizer(training.OptimizerConfig(
      name=c.optimizer, learning_rate=c.learning_rate, warmup_steps=warmup_steps(c, total_steps), decay=c.decay,
      total_steps=total_steps, weight_decay=c.weight_decay, clip_norm=c.clip_norm, grad_accum_steps=c.grad_accum_steps))


def train(c, backbone: Backbone | None = None) -> dict:
  """Trains (or resumes) the run that config `c` describes; returns a summary dict.

  Raises `files.WorkdirBusy` at once if another process holds the workdir, and
  `interrupts.Interrupted` after saving when Ctrl-C stopped the run.
  """
  sharding.initialize_distributed(c.coordinator_address, c.num_processes, c.process_id)
  validate(c)  # before the lock creates the workdir: a bad config leaves nothing behind
  # Process 0 holds the lock for the whole run: the other hosts write into the same workdir with it.
  lock = files.WorkdirLock(c.workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, interrupts.StopGuard() as guard:
    return _train(c, backbone, guard)


RUN_LENGTH_FIELDS = ("max_steps", "num_epochs", "patience")  # when a run stops, not what its steps do


def check_same_training(workdir: str, meta: dict) -> None:
  """Refuses to resume a run under other training fields (`config_keys.training_fields`) than it was started
  with: a changed learning rate, batch, schedule, seed or data would continue one run under another's
  settings, and the metadata, rewritten at start, would no longer say how its first steps were made.
  Under a constant learning rate with warm-up in steps, a run may be resumed to stop at another length."""
  old = ckpt.read_metadata(workdir)
  if old is None or old.get("config") is None:
    return
  was, now = config_keys.training_fields(old["config"]), config_keys.training_fields(meta["config"])
  changed = provenance.changed_fields(was, now)
  if now.get("decay") == "constant" and not now.get("warmup_fraction"):  # the schedule ignores the run's length:
    changed = [k for k in changed if k not in RUN_LENGTH_FIELDS]    # a longer (or shorter) run is the same run
  if changed:
    field = changed[0].split(".")[0]
    raise ckpt.CheckpointError(
        f"{os.path.join(workdir, ckpt.METADATA)}: this run was trained with {field}={was.get(field)!r} and would resume "
        f"with {field}={now.get(field)!r} ({len(changed)} training field(s) differ: {', '.join(changed)}); use another "
        "workdir, or the run's original settings to resume it")


def _train(c, backbone: Backbone | None, guard: interrupts.StopGuard) -> dict:
  started = time.perf_counter()
  run = build(c, backbone)
  os.makedirs(c.workdir, exist_ok=True)
  meta = metadata(run)
  ckpt.check_metadata(c.workdir, meta)
  store = checkpoint_store(c)
  if store.steps():  # a run to resume: only under the settings it was trained with
    check_same_training(c.workdir, meta)
  if jax.process_index() == 0:
    files.write_json_atomic(os.path.join(c.workdir, ckpt.METADATA), meta, sort_keys=True)

  mesh = run.mesh
  graphdef, trainable, frozen = training.split(run.model)
  frozen = jax.device_put(frozen, sharding.state_shardings(frozen, mesh))
  train_it = msp_data.task_batches(run.task, "train", run.backbone.tokenizer, global_batch_size=c.batch_size,
                                   config=run.batch_config, seed=c.seed, num_epochs=None, num_exemplars=c.num_shot,
                                   group_by_length=c.get("group_by_length", False),
                                   group_by_slots=c.get("group_by_slots", False) and mixers.widens_prefix(c.mixture))
  total_steps = c.max_steps or c.num_epochs * train_it.steps_per_epoch // c.grad_accum_steps
  eval_every = eval_interval(c, train_it.steps_per_epoch)
  tx, schedule = make_tx(c, total_steps)
  rep = sharding.replicated(mesh)
  trainable = jax.device_put(trainable, rep)
  opt_state = jax.device_put(tx.init(trainable), rep)  # replicated global arrays: multi-host Orbax needs them
  train_step = training.make_train_step(graphdef, tx, mesh, trainable, opt_state, frozen)
  eval_step = training.make_eval_step(graphdef, mesh, frozen)

  minimize = c.select_metric == "dev_loss"
  step, best, since_best = 0, None, 0
  resumed = store.restore_newest_intact(ckpt.abstract({"trainable": trainable, "opt_state": opt_state}, rep),
                                        warn=say)
  if resumed is not None:  # restored straight into this mesh's shardings, whatever mesh saved it
    _, state, saved = resumed
    trainable, opt_state = state["trainable"], state["opt_state"]
    step, best, since_best = saved["step"], saved.get("best"), saved.get("since_best", 0)
    train_it.set_state(saved["data"])
    print(f"resumed {c.workdir} at step {step}", flush=True)

  def save(metrics=None):
    saved = {"step": step, "best": best, "since_best": since_best, "data": train_it.get_state(),
             "rng": [c.seed, step], "metrics": metrics or {}}
    store.save(step, {"trainable": trainable, "opt_state": opt_state}, saved)

  log = RunLog(c.workdir, first_step=step + 1 if step else 0)
  if step == 0:  # where the prompts start from: the baseline every later eval is compared with
    with announce("evaluating the initial prompts"):
      first = evaluate(run, graphdef, trainable, frozen, eval_step, mesh)
    log.write(0, first)
    print("step 0: " + ", ".join(f"{k} {v:.4g}" for k, v in first.items()), flush=True)
  progress = None  # opened after the first step, so the compile message does not tear the bar
  status = "finished"
  last_eval = None
  compile_start = time.perf_counter()
  say("compiling the train step (the first step includes it) ...")
  try:
    while step < total_steps:
      start, tokens, padding = time.perf_counter(), 0.0, []
      for _ in range(c.grad_accum_steps):
        batch = next(train_it)
        trainable, opt_state, m = train_step(trainable, opt_state, frozen, model_batch(batch, mesh))
        tokens += float(batch["attention_mask"].sum()) * jax.process_count()  # real text tokens, all hosts
        padding.append(padding_shares(batch))
      loss = float(m["loss"])
      if not math.isfinite(loss):
        last = store.latest_step()
        raise MspError(f"loss is {loss} at step {step + 1}; stopped. " + (
            f"The last good checkpoint (step {last}) is kept in {c.workdir}" if last is not None else
            f"No checkpoint had been saved yet, so {c.workdir} has nothing to resume from"))
      step += 1
      guard.graceful = True  # from now on Ctrl-C has a step to save
      seconds = time.perf_counter() - start
      speed = tokens / seconds
      if step % c.log_every == 0:
        log.write(step, {"loss": loss, "lr": float(schedule(step)), "tokens_per_s": speed, "step_s": seconds,
                         "grad_norm": float(m["grad_norm"]),
                         **{k: float(np.mean([p[k] for p in padding])) for k in padding[0]}})
      if progress is None:
        say(f"compiling the train step: first step done in {time.perf_counter() - compile_start:.1f} s")
        progress = _progress(total_steps, step - 1) or False
      if progress:
        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:.0f}")
        progress.update(1)
      if step % eval_every == 0 or step == total_steps:
        last_eval = evaluate(run, graphdef, trainable, frozen, eval_step, mesh)
        value = last_eval[c.select_metric]
        improved = best is None or (value < best if minimize else value > best)
        best, since_best = (value, 0) if improved else (best, since_best + 1)
        log.write(step, last_eval)
        save(last_eval)
        print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()), flush=True)
        if c.patience and since_best >= c.patience:
          status = f"early stop: {c.select_metric} did not improve for {c.patience} evals"
          break
      elif step % c.checkpoint_every == 0:
        save()
      if step < total_steps and stop_requested(guard):
        if store.latest_step() != step:
          save()
        store.close()
        raise interrupts.Interrupted(f"interrupted at step {step}; checkpoint saved in {c.workdir}; "
                                     "re-run the same command to resume")
  finally:
    if progress:
      progress.close()
    log.close()
  summary = {"status": status, "step": step, "best": best, "best_step": store.best_step(),
             "select_metric": c.select_metric, "last_eval": last_eval, "workdir": c.workdir,
             "seconds": round(time.perf_counter() - started, 1), "resumed": resumed is not None}  # this invocation's
  store.close()
  if jax.process_index() == 0:
    files.write_json_atomic(os.path.join(c.workdir, "summary.json"), summary)
  return summary


def stop_requested(guard: interrupts.StopGuard) -> bool:
  """Whether Ctrl-C asked to stop, agreed by all processes (they must save the same step)."""
  if jax.process_count() == 1:
    return guard.requested
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(guard.requested))))


def _progress(total: int, initial: int):
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
