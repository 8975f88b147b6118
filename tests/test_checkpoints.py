"""Checkpoints across restarts: keep-best survives resumes, damaged steps are named (never a
traceback), metadata problems are one-line errors, and a run moves between device counts."""
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import tensorstore as ts

from configs import common
from msp_jax import checkpoints as ckpt
from msp_jax import trainer
from msp_jax.errors import MspError
from msp_jax.files import LOCK
from msp_jax.models.weights import load_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(model_dir, workdir, **extra):
  c = common.get_config(mixture="pooling")
  c.update(model=model_dir, workdir=workdir, n_tokens=4, batch_size=2, max_steps=4, eval_every=2, eval_batches=1,
           bleu_examples=0, checkpoint_every=1, warmup_steps=1, decay="constant", patience=0, max_seeds=2,
           num_generations=1, gen_batch_size=2, max_new_tokens=4)
  c.update(extra)
  return c


def flags(c):
  keys = ("model", "workdir", "n_tokens", "batch_size", "max_steps", "eval_every", "eval_batches", "bleu_examples",
          "checkpoint_every", "warmup_steps", "decay", "patience", "max_seeds", "num_generations", "gen_batch_size",
          "max_new_tokens", "learning_rate")
  return [f"--config.{k}={c[k]}" for k in keys]


def run_main(script, c, *extra):
  return subprocess.run([sys.executable, script, "--config=configs/pooling.py", *flags(c), *extra], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)


def kept_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def truncate_largest_array_file(workdir, step, every=False):
  """Cuts the biggest file under a step's `state` item in half, as a full disk or a killed copy would;
  `every`: each of its files (generation reads the prompts alone, which one file may not hold)."""
  folder = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  for path in files if every else [max(files, key=os.path.getsize)]:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def listing(folder):
  """Every file and its size, but the lock: each run rewrites it with its own pid (its length varies)."""
  return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
                for d, _, names in os.walk(folder) for f in names if f != LOCK)


@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
  return load_backbone(tiny_model_dir)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, backbone, tmp_path_factory):
  """A finished 4-step run: checkpoints 2 and 4 (evals), 1 and 3 pruned."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  trainer.train(tiny_config(tiny_model_dir, workdir), backbone)
  assert kept_steps(workdir) == [2, 4]
  return workdir


@pytest.fixture
def copy_of_trained(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


def test_resumes_keep_the_best_checkpoints_of_an_uninterrupted_run(tiny_model_dir, backbone, tmp_path):
  """Issue 14: resuming used to forget every earlier step's dev metric and delete the best one."""
  # a high rate: dev loss goes up, so best != latest (on these batches: length grouping draws others)
  extra = dict(max_steps=6, keep_best=1, learning_rate=3.0, group_by_length=False)
  straight = str(tmp_path / "straight")
  summary = trainer.train(tiny_config(tiny_model_dir, straight, **extra), backbone)
  resumed = str(tmp_path / "resumed")
  for stop in (2, 4, 6):  # stops on the eval grid: a run also evaluates at its last step
    last = trainer.train(tiny_config(tiny_model_dir, resumed, **dict(extra, max_steps=stop)), backbone)

  # the reference: the best dev loss in the uninterrupted run's log, plus the latest step
  evals = [json.loads(l) for l in open(os.path.join(straight, "metrics.jsonl"))]
  losses = sorted((e["dev_loss"], e["step"]) for e in evals if "dev_loss" in e and e["step"] > 0)
  assert losses[0][1] != 6, "the test needs a best step other than the latest"
  expected = sorted({losses[0][1], 6})
  assert kept_steps(straight) == expected
  assert kept_steps(resumed) == expected
  assert (last["best_step"], last["best"]) == (summary["best_step"], summary["best"]) == (losses[0][1], losses[0][0])


def test_corrupt_latest_step_resumes_from_the_newest_intact_one(copy_of_trained, tiny_model_dir):
  truncate_largest_array_file(copy_of_trained, 4)
  proc = run_main("train.py", tiny_config(tiny_model_dir, copy_of_trained, max_steps=6))
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "Traceback" not in out
  warnings = [l for l in out.splitlines() if l.startswith("warning: ")]
  assert len(warnings) == 1 and "checkpoint step 4" in warnings[0] and "unreadable" in warnings[0], warnings
  assert f"resumed {copy_of_trained} at step 2" in out
  assert kept_steps(copy_of_trained)[-1] == 6


@pytest.mark.parametrize("script,case,expected", [
    ("generate.py", "corrupt_step", "checkpoint step 4 in {workdir}/checkpoints is unreadable"),
    ("generate.py", "no_metadata",
     "{workdir}/metadata.json is missing, though {workdir}/checkpoints holds steps [2, 4]"),
    ("generate.py", "truncated_metadata", "{workdir}/metadata.json: not valid JSON"),
    ("train.py", "truncated_metadata", "{workdir}/metadata.json: not valid JSON"),
    ("generate.py", "bad_checkpoint_flag", "config.checkpoint='foo': valid: best, latest or a step number"),
])
def test_damaged_workdirs_are_one_line_errors_and_write_nothing(script, case, expected, copy_of_trained,
                                                                tiny_model_dir):
  workdir, extra = copy_of_trained, []
  meta = os.path.join(workdir, "metadata.json")
  if case == "corrupt_step":
    truncate_largest_array_file(workdir, 4, every=True)
    extra = ["--config.checkpoint=latest"]
  elif case == "no_metadata":
    os.remove(meta)
  elif case == "truncated_metadata":
    text = open(meta).read()
    open(meta, "w").write(text[:len(text) // 2])
  else:
    extra = ["--config.checkpoint=foo"]
  before = listing(workdir)
  proc = run_main(script, tiny_config(tiny_model_dir, workdir), *extra)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected.format(workdir=workdir) in last, last
  if case == "corrupt_step":
    assert "intact steps: [2]" in last
  assert listing(workdir) == before


def test_nan_before_the_first_checkpoint_says_there_is_none(tiny_model_dir, backbone, tmp_path):
  workdir = str(tmp_path / "nan")
  # a NaN learning rate is refused up front; a huge finite one overflows the prompts within a few steps
  c = tiny_config(tiny_model_dir, workdir, learning_rate=3e38, warmup_steps=0, max_steps=6, eval_every=100,
                  checkpoint_every=100)
  with pytest.raises(MspError) as e:
    trainer.train(c, backbone)
  message = str(e.value)
  assert re.match(r"loss is (nan|inf|-inf) at step \d+; stopped\. No checkpoint had been saved yet", message), message
  assert "None" not in message and "\n" not in message


def test_backbone_mismatch_names_both_sources(tmp_path):
  workdir = str(tmp_path)
  old = {"backbone_source": "/models/a.gguf", "backbone_fingerprint": "aaaa", "attributes": {}}
  json.dump(old, open(os.path.join(workdir, "metadata.json"), "w"))
  new = dict(old, backbone_source="/models/b.gguf", backbone_fingerprint="bbbb")
  with pytest.raises(ckpt.CheckpointError) as e:
    ckpt.check_metadata(workdir, new)
  assert '"aaaa" (from /models/a.gguf)' in str(e.value) and '"bbbb" (from /models/b.gguf)' in str(e.value)


def test_fingerprint_hashes_content_not_the_file_name(tiny_model_dir, tmp_path):
  weights = os.path.join(tiny_model_dir, "model.safetensors")
  renamed = str(tmp_path / "renamed.safetensors")
  shutil.copyfile(weights, renamed)
  assert ckpt.fingerprint(renamed) == ckpt.fingerprint(weights)
  folder = tmp_path / "folder"
  shutil.copytree(tiny_model_dir, folder)
  os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
  assert ckpt.fingerprint(str(folder)) == ckpt.fingerprint(tiny_model_dir)
  with open(renamed, "r+b") as f:  # one changed byte in the first MiB is another backbone
    f.seek(1000)
    byte = f.read(1)
    f.seek(1000)
    f.write(bytes([byte[0] ^ 1]))
  assert ckpt.fingerprint(renamed) != ckpt.fingerprint(weights)


RESHARD_SCRIPT = r"""
import sys, json, warnings, numpy as np, jax
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
warnings.filterwarnings("error", message=".*Sharding info not provided.*")  # Orbax's guess from the saved topology
from msp_jax import assembly, checkpoints as ckpt, sharding, trainer, training
from test_checkpoints import tiny_config
c = tiny_config({model!r}, {workdir!r}, batch_size=8, max_steps={steps})
if {steps}:
  trainer.train(c)
run = assembly.build(c)
_, trainable, _ = training.split(run.model)
tx, _ = trainer.make_tx(c, 1)
mesh = sharding.make_mesh()
rep = sharding.replicated(mesh)
store = assembly.checkpoint_store(c)
target = ckpt.abstract(dict(trainable=trainable, opt_state=jax.eval_shape(tx.init, trainable)), rep)
state, _ = store.restore({step}, target)
assert all(x.sharding == rep for x in jax.tree.leaves(state)), [x.sharding for x in jax.tree.leaves(state)]
leaves = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state)]
print(json.dumps(dict(devices=jax.device_count(), leaves=leaves)))
"""


def reshard_run(devices, model_dir, workdir, steps, step):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  code = RESHARD_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), model=model_dir, workdir=workdir,
                               steps=steps, step=step)
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == devices
  return out["leaves"]


def test_resume_moves_between_one_and_eight_devices(tiny_model_dir, tmp_path):
  """Saved on 1 device, restored into an 8-device mesh (and trained on), restored back on 1: every
  array lands in the current mesh's sharding with the exact saved values."""
  workdir = str(tmp_path / "run")
  saved_on_one = reshard_run(1, tiny_model_dir, workdir, steps=2, step=2)
  assert reshard_run(8, tiny_model_dir, workdir, steps=4, step=2) == saved_on_one
  saved_on_eight = reshard_run(8, tiny_model_dir, workdir, steps=0, step=4)
  assert reshard_run(1, tiny_model_dir, workdir, steps=0, step=4) == saved_on_eight
  assert saved_on_eight != saved_on_one


def test_echoes_of_abandoned_orbax_reads_are_dropped_and_every_other_report_passes():
  """A damaged step's sibling reads are reported whenever they are collected, seconds later on a loaded
  machine: the hook that `Checkpoints` installs drops exactly those."""
  seen = []
  hook = ckpt._DropAbandonedReads(seen.append)

  async def _read_array_index_and_device_put():  # Orbax's name for one array's read
    raise ValueError("truncated")

  abandoned = _read_array_index_and_device_put()
  try:
    abandoned.send(None)
  except ValueError as e:
    from_orbax = types.SimpleNamespace(object=None, exc_value=e, exc_traceback=e.__traceback__)
  hook(types.SimpleNamespace(object=abandoned, exc_value=None, exc_traceback=None))
  hook(from_orbax)
  other = types.SimpleNamespace(object="<coroutine object user_code at 0x1>", exc_value=None, exc_traceback=None)
  hook(other)
  assert seen == [other]


def test_a_read_that_ends_after_its_event_loop_closed_is_dropped():
  """CI's flake (stop 41): a sibling read of a damaged step finished after Orbax's loop had closed,
  and TensorStore reported its failed hand-back as a bare traceback. Here with a real TensorStore future."""
  def late_read_reports():
    reports = []
    promise, future = ts.Promise.new()

    async def wait():
      await future

    loop = asyncio.new_event_loop()
    loop.create_task(wait())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()  # as when gather fails on its first error: the awaiting task's cancellation never ran
    previous, sys.unraisablehook = sys.unraisablehook, reports.append
    try:
      promise.set_result(1)
    finally:
      sys.unraisablehook = previous
    return reports

  late = late_read_reports()
  assert [repr(r.exc_value) for r in late] == ["RuntimeError('Event loop is closed')"]
  seen = []
  hook = ckpt._DropAbandonedReads(seen.append)
  hook(late[0])
  assert seen == []
  closed_elsewhere = types.SimpleNamespace(object="<function user_callback>", exc_value=late[0].exc_value,
                                           exc_traceback=late[0].exc_traceback)
  hook(closed_elsewhere)
  assert seen == [closed_elsewhere]
