"""Run state on disk: Orbax checkpoints of the trainable state, and `metadata.json`.

A checkpoint holds only what changes: trainable prompts and mixer, optimizer state, and a JSON
item (step, RNG, data position, metrics). The frozen backbone is named and fingerprinted in
`metadata.json` instead, so a restore onto another backbone fails loudly. The best-k checkpoints by
the selection metric are kept plus the latest (needed to resume), across restarts; a step that no
longer reads back whole is named, never a traceback.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from msp_jax.errors import MspError

METADATA = "metadata.json"


class CheckpointError(MspError):
  """A workdir whose checkpoints or metadata do not fit the run asked for."""


def fingerprint(path: str) -> str:
  """A short content hash of a backbone file or folder: sizes plus the first and last MiB of each
  weight file (hashing gigabytes at every start would cost more than it protects). File names are
  left out, so the same GGUF renamed or moved still matches."""
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".gguf", "config.json")))
  h = hashlib.sha256()
  for file in files:
    size = os.path.getsize(file)
    h.update(f"{size}:".encode())
    with open(file, "rb") as f:
      h.update(f.read(1 << 20))
      f.seek(max(size - (1 << 20), 0))
      h.update(f.read(1 << 20))
  return h.hexdigest()[:16]


def read_metadata(workdir: str) -> dict | None:
  path = os.path.join(workdir, METADATA)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); train.py writes it "
                          "at start: delete it and re-run train.py with the run's config and workdir") from None


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
      was, now = _short(old.get(key)), _short(metadata.get(key))
      if key == "backbone_fingerprint":  # two hashes alone do not tell which files to compare
        was, now = f"{was} (from {old.get('backbone_source')})", f"{now} (from {metadata.get('backbone_source')})"
      raise CheckpointError(f"{path}: {key} is {was} but this run has {now}; "
                            "use another workdir or the original settings")


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) < 80 else text[:77] + "..."


def abstract(tree: Any, sharding: Any = None) -> Any:
  """Shape, dtype and sharding of every array in `tree` (each leaf's own sharding unless `sharding`
  is given): a restore target that allocates nothing and tells Orbax where each array must land."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if sharding is None else sharding), tree)


class Checkpoints:
  """Orbax CheckpointManager over `workdir/checkpoints`, keeping the best `keep_best` steps by
  `metric` (lower is better when `minimize`; ties keep the earlier step) and always the latest.

  Keep-best is applied here, from the metrics inside each step's own `meta` item, not by Orbax's
  BestN policy: Orbax writes the metrics BestN reads only when `best_fn` is set, so after a restart
  it saw every earlier step as unscored and deleted the best one at the next save."""

  def __init__(self, workdir: str, *, metric: str, minimize: bool, keep_best: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False, create=True)
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    self.metric, self.minimize, self.keep_best = metric, minimize, keep_best
    self._metrics: dict[int, dict] = {}  # step -> its dev metrics ({} between evals or unreadable)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves `state` and the JSON `meta` (its "metrics": the dev metrics, {} between evals) as `step`,
    then deletes every step that is neither the latest nor among the best `keep_best`."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      force=True)
    self.manager.wait_until_finished()
    self._metrics[step] = meta.get("metrics") or {}
    keep = set(self.best_steps()) | {self.latest_step()}
    for old in self.steps():
      if old not in keep:
        self.delete(old)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_steps(self) -> list[int]:
    """The best `keep_best` steps that have the metric, best first."""
    scored = sorted((m[self.metric] * (1 if self.minimize else -1), step)
                    for step in self.steps() if self.metric in (m := self.step_metrics(step)))
    return [step for _, step in scored[:self.keep_best]]

  def best_step(self) -> int | None:
    """The kept step with the best metric (the latest if none has metrics)."""
    best = self.best_steps()
    return best[0] if best else self.latest_step()

  def step_metrics(self, step: int) -> dict:
    if step not in self._metrics:
      try:
        self._metrics[step] = self.restore_meta(step).get("metrics") or {}
      except CheckpointError:
        self._metrics[step] = {}  # an unreadable step is never "best"
    return self._metrics[step]

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of `step`, each array placed as its `abstract_state` leaf says (see `abstract`)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    out = self._read(step, args)
    return out["state"], out["meta"]

  def restore_part(self, step: int, abstract_part: dict) -> dict:
    """Only the top-level entries of `step`'s state that `abstract_part` names (e.g. the trainable
    prompts without the optimizer state): generation reads what it uses and builds no optimizer."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_part)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(item=abstract_part, restore_args=restore_args,
                                                           partial_restore=True))
    return self._read(step, args)["state"]

  def restore_meta(self, step: int) -> dict:
    return self._read(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_newest_intact(self, abstract_state: Any, warn=print) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest step that reads back whole, or None if there is none.

    Every step that does not read back (a truncated file, a partial copy) is deleted with a one-line
    warning: it holds nothing usable, a step newer than the resumed one would block re-saving that
    step, and an older one could otherwise be kept as "best" and fail generation later."""
    newest = None
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(step, abstract_state)
      except CheckpointError as e:
        warn(f"warning: {e}; deleted it")
        self.delete(step)
        continue
      newest = newest or (step, state, meta)
    return newest

  def intact_steps(self, abstract_part: dict) -> list[int]:
    """The kept steps whose entries named by `abstract_part` read back whole (for error messages)."""
    intact = []
    for step in self.steps():
      try:
        self.restore_part(step, abstract_part)
        intact.append(step)
      except CheckpointError:
        pass
    return intact

  def delete(self, step: int) -> None:
    self.manager.delete(step)
    self._metrics.pop(step, None)

  def _read(self, step: int, args) -> dict:
    _quiet_abandoned_reads()
    try:
      return self.manager.restore(step, args=args)
    except Exception as e:  # Orbax/TensorStore raise many types for a damaged file; the step is what matters
      reason = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0][:200]
      failure = f"checkpoint step {step} in {self.directory} is unreadable ({type(e).__name__}: {reason})"
    gc.collect()  # most echoes of the abandoned reads now, while the hook drops them
    raise CheckpointError(failure)

  def close(self) -> None:
    self.manager.close()


_ORBAX_READ = "_read_array_index_and_device_put"  # the coroutine that reads one array of a step


class _DropAbandonedReads:
  """An unraisablehook that drops the reports of abandoned Orbax reads and passes on everything else.

  When one array of a step fails to read, Orbax abandons its sibling reads, and Python reports each
  abandoned coroutine as an "Exception ignored" traceback on stderr whenever it is collected: at once,
  or seconds later on a loaded machine. The failure itself is raised, named, by `_read`; these reports
  are only its echoes. A sibling read can also end after Orbax's event loop has closed: TensorStore
  then fails to hand it back (`call_soon_threadsafe` on the closed loop) and reports that, too."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, report) -> None:
    if not (_ORBAX_READ in repr(report.object) or _passes_through(report.exc_traceback, _ORBAX_READ)
            or _ended_after_its_loop(report)):
      self.previous(report)


def _ended_after_its_loop(report) -> bool:
  """TensorStore's report (no object) of a finished read whose awaiting event loop had closed."""
  return (report.object is None and isinstance(report.exc_value, RuntimeError)
          and str(report.exc_value) == "Event loop is closed"
          and _passes_through(report.exc_traceback, "call_soon_threadsafe"))


def _passes_through(tb, function: str) -> bool:
  while tb is not None:
    if tb.tb_frame.f_code.co_name == function:
      return True
    tb = tb.tb_next
  return False


def _quiet_abandoned_reads() -> None:
  """Installs the hook for the rest of the process: the echoes can come any time after a failed read."""
  if not isinstance(sys.unraisablehook, _DropAbandonedReads):
    sys.unraisablehook = _DropAbandonedReads(sys.unraisablehook)
