"""Run state on disk: Orbax checkpoints of the trainable state, and `metadata.json`.

A checkpoint holds only what changes: trainable prompts and mixer, optimizer state, and a JSON
item (step, RNG, data position, metrics). The frozen backbone is named and fingerprinted in
`metadata.json` instead, so a restore onto another backbone fails loudly. Orbax keeps the best-k
checkpoints by the selection metric plus the latest (needed to resume).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import orbax.checkpoint as ocp

from msp_jax import files
from msp_jax.errors import MspError

METADATA = "metadata.json"


class CheckpointError(MspError):
  """A workdir whose checkpoints or metadata do not fit the run asked for."""


def fingerprint(path: str) -> str:
  """A short content hash of a backbone file or folder: sizes plus the first and last MiB of each
  weight file (hashing gigabytes at every start would cost more than it protects)."""
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".gguf", "config.json")))
  h = hashlib.sha256()
  for file in files:
    size = os.path.getsize(file)
    h.update(f"{os.path.basename(file)}:{size}".encode())
    with open(file, "rb") as f:
      h.update(f.read(1 << 20))
      f.seek(max(size - (1 << 20), 0))
      h.update(f.read(1 << 20))
  return h.hexdigest()[:16]


def write_json_atomic(path: str, data: Any) -> None:
  files.write_json_atomic(path, data, sort_keys=True)


def read_metadata(workdir: str) -> dict | None:
  path = os.path.join(workdir, METADATA)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_metadata(workdir: str, metadata: dict) -> None:
  """Fails if `workdir` was trained with another backbone, data or prompt shape than `metadata`."""
  old = read_metadata(workdir)
  if old is None:
    return
  path = os.path.join(workdir, METADATA)
  trained = old.get("attributes") or {}
  unknown = [f"{s}/{n}" for s, names in (metadata.get("attributes") or {}).items() for n in names
             if n not in trained.get(s, ())]
  if unknown:
    raise CheckpointError(f"{path}: attribute {unknown[0]!r} is not in the trained vocabulary ({len(unknown)} such, "
                          f"e.g. {unknown[:3]}); generate with the dataset/domain the prompts were trained on")
  for key in ("backbone_fingerprint", "attributes", "mixture", "n_tokens", "attribute_tokens"):
    if old.get(key) != metadata.get(key):
      raise CheckpointError(f"{path}: {key} is {_short(old.get(key))} but this run has "
                            f"{_short(metadata.get(key))}; use another workdir or the original settings")


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) < 80 else text[:77] + "..."


class Checkpoints:
  """Orbax CheckpointManager over `workdir/checkpoints`, keeping the best `keep_best` by
  `metric` (lower is better when `minimize`) and always the latest."""

  def __init__(self, workdir: str, *, metric: str, minimize: bool, keep_best: int = 2):
    policy = ocp.checkpoint_managers
    preserve = policy.AnyPreservationPolicy([
        policy.LatestN(1),
        policy.BestN(get_metric_fn=lambda m: m[metric], reverse=minimize, n=keep_best,
                     keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=preserve, enable_async_checkpointing=False, create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                                         item_names=("state", "meta"))
    self.metric, self.minimize = metric, minimize

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      metrics=metrics, force=True)
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best metric (the latest if none has metrics)."""
    scored = []
    for step in self.manager.all_steps():
      meta = self.restore_meta(step)
      if self.metric in meta.get("metrics", {}):
        scored.append((meta["metrics"][self.metric] * (1 if self.minimize else -1), step))
    return min(scored)[1] if scored else self.latest_step()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    self.manager.close()
