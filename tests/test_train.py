"""`train.py` end to end on real NLU++ data: it learns, resumes exactly, and refuses bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from msp_jax import trainer
from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_flags(model_dir, workdir, **extra):
  flags = dict(model=model_dir, workdir=workdir, n_tokens=4, batch_size=2, max_steps=8, eval_every=4,
               eval_batches=1, bleu_examples=2, max_new_tokens=4, checkpoint_every=1, warmup_steps=1)
  flags.update(extra)
  return [f"--config.{k}={v}" for k, v in flags.items()]


def run_train(flags, mixture="pooling", **popen):
  cmd = [sys.executable, "train.py", f"--config=configs/{mixture}.py", *flags]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def final_prompts(workdir, step):
  state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return {k: np.asarray(v) for k, v in _flatten(state["trainable"]).items()}


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def test_killed_run_resumes_to_the_same_prompts(tiny_model_dir, tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  proc = run_train(tiny_flags(tiny_model_dir, straight))
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]

  proc = run_train(tiny_flags(tiny_model_dir, killed))
  metrics = os.path.join(killed, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline:  # SIGKILL once step 3 has been logged: mid-run, between checkpoints or not
    if os.path.exists(metrics) and any(json.loads(l).get("step", 0) >= 3 and "loss" in l for l in open(metrics)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  proc = run_train(tiny_flags(tiny_model_dir, killed))
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert "resumed" in out
  a, b = final_prompts(straight, 8), final_prompts(killed, 8)
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_outputs_in_workdir(tiny_model_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_train(tiny_flags(tiny_model_dir, workdir, max_steps=4), mixture="concat")
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  meta = json.load(open(os.path.join(workdir, "metadata.json")))
  assert meta["mixture"] == "concat" and meta["n_tokens"] == 4 and meta["backbone"] == tiny_model_dir
  assert len(meta["backbone_fingerprint"]) == 16 and meta["attributes"]["intents"][:2] == ["accesibility", "acknowledge"]
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {"step", "loss", "lr", "tokens_per_s"} <= set(lines[1]) and any("dev_bleu" in l for l in lines)
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert json.load(open(os.path.join(workdir, "summary.json")))["step"] == 4


def test_restoring_onto_another_backbone_is_an_error(tiny_model_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_train(tiny_flags(tiny_model_dir, workdir, max_steps=1))
  assert proc.wait(timeout=600) == 0
  proc = run_train(tiny_flags("smollm2-135m-instruct", workdir, max_steps=2))
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode != 0
  last = out.strip().splitlines()[-1]
  assert last.startswith("error: ") and "backbone_fingerprint" in last and "metadata.json" in last


def test_a_run_resumes_only_under_its_own_training_settings(tiny_model_dir, tmp_path):
  """A checkpointed run re-run with another learning rate, or another length under a cosine schedule, is
  refused in one line naming the field and both values, and leaves the run as it was; a changed field that
  does not touch training (log_every) resumes it. (Under a constant rate a run may be extended:
  tests/test_checkpoints.py resumes runs to longer max_steps.)"""
  workdir = str(tmp_path / "run")
  proc = run_train(tiny_flags(tiny_model_dir, workdir, max_steps=2))
  assert proc.wait(timeout=600) == 0
  meta = open(os.path.join(workdir, "metadata.json")).read()
  proc = run_train(tiny_flags(tiny_model_dir, workdir, max_steps=2, learning_rate=0.5))
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode != 0, out[-3000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith("error: ") and "metadata.json" in last and "learning_rate=0.01" in last, last
  assert "learning_rate=0.5" in last and "1 training field(s) differ: learning_rate)" in last, last
  assert open(os.path.join(workdir, "metadata.json")).read() == meta  # the record of how it was trained is kept
  proc = run_train(tiny_flags(tiny_model_dir, workdir, max_steps=3))  # cosine decay over 2 steps: a longer run is another
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode != 0 and "trained with max_steps=2 and would resume with max_steps=3" in out, out[-3000:]
  proc = run_train(tiny_flags(tiny_model_dir, workdir, max_steps=2, log_every=5))
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0 and "resumed" in out, out[-3000:]


@pytest.mark.parametrize("flag,message", [
    ("--config.mixture=mean", "config.mixture='mean': valid: concat, pooling, attention, bottleneck, cnn, none"),
    ("--config.max_steps=-3", "config.max_steps=-3: must be >= 0"),
    ("--config.domain=casino", "config.domain='casino': valid for nlupp: banking, hotels"),
    ("--config.warmup_fraction=1.5", "config.warmup_fraction=1.5: the share of all steps spent warming up: "
                                     "valid 0 <= warmup_fraction < 1 (0: warmup_steps)"),
])
def test_config_errors_are_one_line(flag, message, tmp_path):
  proc = run_train([flag, f"--config.workdir={tmp_path}/w"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert out.strip().splitlines()[-1] == f"error: {message}"
  assert not os.path.exists(f"{tmp_path}/w")


def test_nan_loss_stops_with_the_step(tiny_model_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  # A NaN learning rate is refused before loading now; a huge finite one blows the prompts up within a few
  # steps (Adam's update is ~lr per element), which is how a real run diverges.
  proc = run_train(tiny_flags(tiny_model_dir, workdir, learning_rate="3e38", warmup_steps=0,
                              max_steps=6, eval_every=100))
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode != 0
  last = out.strip().splitlines()[-1]
  match = re.match(r"error: loss is (nan|inf|-inf) at step (\d+); stopped\. The last good checkpoint \(step (\d+)\)", last)
  assert match and int(match.group(3)) == int(match.group(2)) - 1, out  # checkpoint_every=1


def test_short_real_run_lowers_dev_loss(tmp_path):
  """SmolLM2-135M on NLU++ hotels: 20 prompt-only steps lower the dev loss clearly."""
  c = common.get_config(mixture="attention")
  c.update(workdir=str(tmp_path / "real"), n_tokens=20, batch_size=4, max_steps=20, eval_every=20, eval_batches=4,
           bleu_examples=0, warmup_steps=2)
  summary = trainer.train(c)
  lines = [json.loads(l) for l in open(os.path.join(c.workdir, "metrics.jsonl"))]
  before = next(l["dev_loss"] for l in lines if l["step"] == 0)
  after = summary["last_eval"]["dev_loss"]
  assert after < before - 0.4, (before, after)


def test_epoch_evaluations_and_warmup_as_a_share_of_the_steps(tiny_model_dir, tmp_path):
  """eval_every=0: dev loss once an epoch (98 hotels seeds / batch 32 = 3 steps); warmup_fraction=0.5 of 6
  steps = 3 linear warm-up steps to the learning rate (hand-computed: lr x step / 3)."""
  c = common.get_config(mixture="pooling")
  c.update(model=tiny_model_dir, workdir=str(tmp_path / "run"), n_tokens=4, batch_size=32, max_steps=0, num_epochs=2,
           eval_every=0, eval_batches=1, bleu_examples=0, warmup_fraction=0.5, learning_rate=0.3, decay="constant",
           checkpoint_every=100)
  trainer.train(c)
  lines = [json.loads(l) for l in open(os.path.join(c.workdir, "metrics.jsonl"))]
  assert [l["step"] for l in lines if "dev_loss" in l] == [0, 3, 6]
  np.testing.assert_allclose([l["lr"] for l in lines if "lr" in l], [0.1, 0.2, 0.3, 0.3, 0.3, 0.3], rtol=1e-6)
