"""The prompt-only step on tiny random backbones: it trains the prompts, and only the prompts."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msp_jax import mixers, sharding, training
from msp_jax import prompts as soft_prompts
from msp_jax.models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_backbone(family):
  if family == "llama":
    return llama.Llama(llama.LlamaConfig(101, 32, 48, 2, 4, 2, 8, tie_word_embeddings=True), rngs=nnx.Rngs(0)), False
  if family == "gpt2":
    from msp_jax.models import gpt2
    cfg = gpt2.GPT2Config.from_hf(dict(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    return gpt2.GPT2(cfg, rngs=nnx.Rngs(0)), False
  from msp_jax.models import t5
  cfg = t5.T5Config.from_hf(dict(vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", tie_word_embeddings=False))
  return t5.T5(cfg, rngs=nnx.Rngs(0)), True


def tiny_model(family="llama", mixer="attention", seed=0):
  backbone, enc_dec = tiny_backbone(family)
  rng = np.random.default_rng(seed)
  prompts = soft_prompts.SoftPrompts(
      rng.normal(size=(5, 32)), {"intent": rng.normal(size=(6, 4, 32)), "slot": rng.normal(size=(3, 4, 32))},
      mixer, rngs=nnx.Rngs(1))
  return training.PromptedModel(backbone, prompts, encoder_decoder=enc_dec)


def tiny_batch(enc_dec=False, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 101, (batch, 10))
  mask = np.ones((batch, 10), bool)
  mask[0, :3] = False  # a left-padded row
  out = dict(input_ids=ids, attention_mask=mask, attribute_ids=rng.integers(0, 3, (batch, 2, 2)),
             attribute_mask=np.array([[[1, 1], [1, 0]]] * batch, bool))
  if enc_dec:
    out.update(decoder_input_ids=rng.integers(3, 101, (batch, 6)), decoder_attention_mask=np.ones((batch, 6), bool),
               labels=rng.integers(3, 101, (batch, 6)), loss_mask=np.ones((batch, 6), bool))
  else:
    loss_mask = np.zeros((batch, 10), bool)
    loss_mask[:, 6:] = True
    out["loss_mask"] = loss_mask
  return out


def run_steps(model, batch, steps, mesh=None, lr=1e-2):
  graphdef, trainable, frozen = training.split(model)
  tx, _ = training.make_optimizer(training.OptimizerConfig(learning_rate=lr, total_steps=steps))
  opt_state = tx.init(trainable)
  step = training.make_train_step(graphdef, tx, mesh or sharding.make_mesh(), trainable, opt_state, frozen)
  losses = []
  for _ in range(steps):
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
    losses.append(float(metrics["loss"]))
  return trainable, opt_state, frozen, losses


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("mixer", sorted(mixers.MIXERS))
def test_one_step_every_backbone_and_mixer(family, mixer):
  model = tiny_model(family, mixer)
  _, before, frozen_before = training.split(model)
  before = jax.tree.map(np.array, before)
  frozen_before = jax.tree.map(np.array, frozen_before)
  # Two steps: the bottleneck's down projection gets a gradient only once its zero-initialised up has moved.
  trainable, _, frozen, losses = run_steps(model, tiny_batch(model.encoder_decoder), 2)
  assert np.isfinite(losses).all()
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)]
  assert any("mixer" in p for p in paths) == (mixer not in ("concat", "pooling"))  # the mixers with weights
  unchanged = [p for p, a, b in zip(paths, jax.tree.leaves(before), jax.tree.leaves(trainable))
               if np.array_equal(a, np.asarray(b))]
  assert not unchanged  # every prompt and mixer leaf trains
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):  # bit-identical backbone
    np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("family,mixer", [*(("llama", m) for m in sorted(mixers.MIXERS)), ("t5", "concat")])
def test_the_bucketed_attribute_axis_gives_the_loss_and_gradients_of_the_full_one(family, mixer):
  """Batches carry M = a power of two that fits their largest set, not max_mixture: the padding slots
  they drop must not have counted (masked keys, skipped positions), or bucketing would change training."""
  model = tiny_model(family, mixer)
  graphdef, trainable, frozen = training.split(model)
  narrow = tiny_batch(model.encoder_decoder)  # M = 2
  wide = dict(narrow, **{k: np.concatenate([narrow[k], np.zeros(narrow[k].shape[:2] + (8,), narrow[k].dtype)], 2)
                         for k in ("attribute_ids", "attribute_mask")})  # M = 10, as without bucketing

  def loss(trainable, batch):
    return training.loss_and_count(nnx.merge(graphdef, trainable, frozen), batch)[0]

  (a, ga), (b, gb) = (jax.value_and_grad(loss)(trainable, jax.tree.map(jnp.asarray, batch)) for batch in (narrow, wide))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family,mixer", [("llama", "attention"), ("llama", "bottleneck"), ("gpt2", "concat")])
def test_a_loss_window_gives_the_loss_and_gradients_of_the_full_mask(family, mixer):
  """make_batch's loss mask covers only the suffix that holds the targets (logits computed there alone):
  the loss and the prompts' gradients equal those of the full-width mask, which a hand-computed
  log-softmax over every position confirms."""
  model = tiny_model(family, mixer)
  graphdef, trainable, frozen = training.split(model)
  full = tiny_batch()  # targets in columns 6-9 of 10
  windows = [dict(full, loss_mask=full["loss_mask"][:, -w:]) for w in (4, 6)]

  def loss(trainable, batch):
    return training.loss_and_count(nnx.merge(graphdef, trainable, frozen), batch)[0]

  grad = jax.jit(jax.value_and_grad(loss))
  (a, ga), *rest = [grad(trainable, jax.tree.map(jnp.asarray, b)) for b in (full, *windows)]
  for b, gb in rest:
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)
  merged = nnx.merge(graphdef, trainable, frozen)  # the reference: every position's logits, numpy log-softmax
  prefix, prefix_mask = merged.prefix(jax.tree.map(jnp.asarray, full))
  logits = np.asarray(merged.backbone(jnp.asarray(full["input_ids"]), jnp.asarray(full["attention_mask"]),
                                      embedded_prefix=prefix, prefix_mask=prefix_mask), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp[:, :-1], full["input_ids"][:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(a, (nll * full["loss_mask"][:, 1:]).sum() / full["loss_mask"][:, 1:].sum(), rtol=1e-5)


def test_optimizer_state_exists_for_trainable_leaves_only():
  model = tiny_model()
  _, trainable, frozen = training.split(model)
  _, opt_state, _, _ = run_steps(model, tiny_batch(), 1)
  n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
  n_opt = sum(x.size for x in jax.tree.leaves(opt_state))
  assert n_frozen > n_trainable
  assert n_opt <= 2 * n_trainable + 16  # Adam's two moments and a few counters, nothing of the backbone


def test_loss_goes_down():
  # A random tiny backbone barely listens to its input, so the drop is small but steady.
  _, _, _, losses = run_steps(tiny_model(), tiny_batch(), 15, lr=0.3)
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses


def test_gradient_accumulation_weighs_micro_batches_by_target_tokens():
  """Two micro-batches with 24 and 8 target tokens (the first has 3 of 4 as many: a mean of their means
  would weigh each of its tokens a third as much) give, over two steps, the updates, loss and gradient
  norm of one batch holding both: sum of token NLL / 32."""
  model = tiny_model()
  graphdef, trainable, frozen = training.split(model)
  big = tiny_batch(batch=8)
  big["loss_mask"][4:, 6:8] = False  # rows 0-3: 4 target tokens each (16), rows 4-7: 2 each (8)
  big["loss_mask"][:2, 5] = True     # rows 0-1: one more (24 in the first half)
  halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
  assert [int(h["loss_mask"][:, 1:].sum()) for h in halves] == [18, 8]  # token t is predicted from t - 1
  mesh = sharding.make_mesh()
  results = []
  for accum, batches in ((1, [big]), (2, halves)):
    tx, _ = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-2, total_steps=4, grad_accum_steps=accum))
    t = jax.tree.map(jnp.array, trainable)
    o = tx.init(t)
    step = training.make_train_step(graphdef, tx, mesh, t, o, frozen)
    logged = []
    for _ in range(2):  # two steps: Adam's second update depends on the gradients' sizes, not just signs
      for b in batches:
        t, o, metrics = step(t, o, frozen, b)
      logged.append((float(metrics["loss"]), float(metrics["grad_norm"]), float(metrics["tokens"])))
    results.append((jax.tree.leaves(t), logged))
  (big_params, big_logged), (acc_params, acc_logged) = results
  for a, b in zip(big_params, acc_params):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)  # Adam's 1/sqrt(v) amplifies fp32 noise
  assert [n for _, _, n in acc_logged] == [26.0, 26.0]
  np.testing.assert_allclose(acc_logged, big_logged, rtol=1e-5)


SHARDED_SCRIPT = r"""
import sys, json, numpy as np, jax
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from msp_jax import sharding
from test_training_step import tiny_model, tiny_batch, run_steps
assert jax.device_count() == 8
out = {{}}
for name, mesh in (("one", sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))),
                   ("data8", sharding.make_mesh(1)), ("data4_model2", sharding.make_mesh(2))):
  trainable, _, _, losses = run_steps(tiny_model(), tiny_batch(batch=8), 3, mesh=mesh)
  out[name] = dict(losses=losses, params=[np.asarray(x).ravel().tolist() for x in jax.tree.leaves(trainable)])
print(json.dumps(out))
"""


def test_sharded_step_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  code = SHARDED_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for name in ("data8", "data4_model2"):
    np.testing.assert_allclose(out[name]["losses"], out["one"]["losses"], rtol=1e-5)  # stated tolerance
    for a, b in zip(out[name]["params"], out["one"]["params"]):
      np.testing.assert_allclose(a, b, atol=1e-5)


MULTIHOST_SCRIPT = r"""
import sys, json, numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from msp_jax import sharding
pid, n = int(sys.argv[1]), int(sys.argv[2])
if n > 1:
  sharding.initialize_distributed("localhost:{port}", n, pid)
import jax
from test_training_step import tiny_model, tiny_batch
from msp_jax import training
model, batch = tiny_model(), tiny_batch(batch=8)
rows = slice(pid * 8 // n, (pid + 1) * 8 // n)  # each process feeds only its own rows
mesh = sharding.make_mesh()
graphdef, trainable, frozen = training.split(model)
tx, _ = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-2, total_steps=3))
rep = sharding.replicated(mesh)
trainable = jax.device_put(trainable, rep)
opt_state = jax.device_put(tx.init(trainable), rep)
frozen = jax.device_put(frozen, sharding.state_shardings(frozen, mesh))
step = training.make_train_step(graphdef, tx, mesh, trainable, opt_state, frozen)
losses = []
for _ in range(3):
  local = {{k: v[rows] for k, v in batch.items()}}
  trainable, opt_state, m = step(trainable, opt_state, frozen, sharding.global_batch(local, mesh))
  losses.append(float(m["loss"]))
params = [np.asarray(jax.device_get(x)).ravel().tolist() for x in jax.tree.leaves(trainable)]
print(json.dumps(dict(devices=jax.device_count(), losses=losses, params=params)))
"""


def test_two_processes_match_one():
  import json
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  code = MULTIHOST_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), port=port)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i), "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  single = subprocess.run([sys.executable, "-c", code, "0", "1"], env=env, capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  one = json.loads(single.stdout.strip().splitlines()[-1])
  for out, _ in outs:
    two = json.loads(out.strip().splitlines()[-1])
    assert two["devices"] == 2 and one["devices"] == 1
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    for a, b in zip(two["params"], one["params"]):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_adafactor_and_constant_schedule_train():
  model = tiny_model()
  graphdef, trainable, frozen = training.split(model)
  tx, schedule = training.make_optimizer(training.OptimizerConfig(name="adafactor", decay="constant", warmup_steps=2,
                                                                  learning_rate=0.1))
  assert float(schedule(1)) == pytest.approx(0.05) and float(schedule(50)) == pytest.approx(0.1)
  opt_state = tx.init(trainable)
  step = training.make_train_step(graphdef, tx, sharding.make_mesh(), trainable, opt_state, frozen)
  before = jax.tree.map(np.array, trainable)
  for _ in range(3):
    trainable, opt_state, _ = step(trainable, opt_state, frozen, tiny_batch())
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trainable)))
