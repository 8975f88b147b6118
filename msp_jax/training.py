"""The prompt-only train step: loss, optimizer, and a jitted, sharded update of the prompts alone.

The model is split once into (graphdef, trainable, frozen) by variable type: `PromptParam` leaves
are trainable, everything else (the backbone) is frozen. The jitted step differentiates w.r.t.
`trainable` only, so XLA never builds weight gradients for the backbone; the optimizer state exists
for the trainable tree only; trainable and optimizer state are donated, frozen weights never are,
and they are jit arguments, never closed-over constants.

Batch (numpy or jax arrays, leading batch axis):
  decoder-only: input_ids, attention_mask [B, T]; loss_mask [B, W] marks target tokens among the
    last W <= T columns (`make_batch` gives the bucketed suffix holding every row's target; token t is
    predicted by logits[t - 1], computed for those columns only); attribute_ids, attribute_mask [B, S, M].
  encoder-decoder: input_ids, attention_mask (encoder); decoder_input_ids, decoder_attention_mask,
    labels, loss_mask [B, Td] (labels[t] predicted by logits[t]); attribute_ids, attribute_mask.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from msp_jax import sharding
from msp_jax.data.batching import full_loss_mask
from msp_jax.losses import token_nll
from msp_jax.mixers import PromptParam
from msp_jax.prompts import SoftPrompts, pooled_text

MODEL_KEYS = ("input_ids", "attention_mask", "loss_mask", "attribute_ids", "attribute_mask",
              "decoder_input_ids", "decoder_attention_mask", "labels")  # the batch arrays the model reads


class PromptedModel(nnx.Module):
  """A frozen backbone with trainable soft prompts in front of it."""

  def __init__(self, backbone: nnx.Module, prompts: SoftPrompts, *, encoder_decoder: bool):
    self.backbone, self.prompts, self.encoder_decoder = backbone, prompts, encoder_decoder

  def prefix(self, batch):
    """(prefix [B, P+A, D], prefix_mask) for a batch; the attention/bottleneck mixers look at the
    max-pooled embeddings of the text tokens (never the target: generation has none)."""
    text_mask = batch["attention_mask"].astype(bool)
    if not self.encoder_decoder:
      text_mask = text_mask & ~full_loss_mask(batch["loss_mask"].astype(bool), text_mask.shape[1])
    text = pooled_text(jax.lax.stop_gradient(self.backbone.embed_tokens(batch["input_ids"])), text_mask)
    return self.prompts(batch["attribute_ids"], batch["attribute_mask"], text)

  def token_losses(self, batch):
    """(per-token NLL [B, T'], target mask [B, T']), in fp32."""
    prefix, prefix_mask = self.prefix(batch)
    if self.encoder_decoder:
      logits = self.backbone(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                             batch["decoder_attention_mask"], embedded_prefix=prefix, prefix_mask=prefix_mask)
      targets, mask = batch["labels"], batch["loss_mask"]
    else:  # the loss window: the last w columns (the first column is never a target: nothing predicts it)
      w = min(batch["loss_mask"].shape[1], batch["input_ids"].shape[1] - 1)
      logits = self.backbone(batch["input_ids"], batch["attention_mask"], embedded_prefix=prefix,
                             prefix_mask=prefix_mask, columns=slice(-(w + 1), -1))
      targets, mask = batch["input_ids"][:, -w:], batch["loss_mask"][:, -w:]
    return token_nll(logits, targets), mask.astype(jnp.float32)


def loss_and_count(model: PromptedModel, batch):
  nll, mask = model.token_losses(batch)
  count = mask.sum()
  return (nll * mask).sum() / jnp.maximum(count, 1.0), count


def split(model: PromptedModel):
  """(graphdef, trainable, frozen): the one split the whole run uses."""
  return nnx.split(model, PromptParam, ...)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adamw"            # adamw | adafactor
  learning_rate: float = 3e-4
  warmup_steps: int = 0
  decay: str = "cosine"          # cosine | constant
  total_steps: int = 1000
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  grad_accum_steps: int = 1


class Accumulation(NamedTuple):
  """Optimizer state while accumulating: the micro-batches of the current step so far, as running
  means weighted by target tokens."""
  inner: Any              # the wrapped optimizer's state
  loss: jax.Array         # mean target-token NLL over them
  grads: Any              # gradient of that mean
  tokens: jax.Array       # their target tokens
  micro_steps: jax.Array  # how many


def accumulate(state: Accumulation, loss, grads, tokens):
  """(loss, grads, tokens) of the step so far once one more micro-batch (its mean loss and gradient
  over `tokens` target tokens) joins: each micro-batch weighs by its target tokens, so the result is
  exactly one batch holding them all."""
  total = state.tokens + tokens
  share = tokens / jnp.maximum(total, 1.0)
  mix = lambda so_far, new: so_far + share * (new - so_far)
  return mix(state.loss, loss), jax.tree.map(mix, state.grads, grads), total


def accumulate_by_tokens(inner: optax.GradientTransformation, every_k: int) -> optax.GradientTransformationExtraArgs:
  """Applies `inner` once every `every_k` micro-batches to their token-weighted mean gradient (zero
  updates in between). `optax.MultiSteps` averages per-micro-batch means instead, which over-weights
  the target tokens of micro-batches that have few. `update(grads, state, params, loss=, tokens=)`."""

  def init(params):
    zero = lambda: jnp.zeros((), jnp.float32)  # one buffer per leaf: the train step donates each
    return Accumulation(inner.init(params), zero(), jax.tree.map(jnp.zeros_like, params), zero(), jnp.zeros((), jnp.int32))

  def update(grads, state, params=None, *, loss, tokens, **unused):
    loss, grads, tokens = accumulate(state, loss, grads, tokens)
    zeros = jax.tree.map(jnp.zeros_like, grads)

    def apply():
      updates, inner_state = inner.update(grads, state.inner, params)
      return updates, Accumulation(inner_state, jnp.zeros_like(loss), zeros, jnp.zeros_like(tokens),
                                   jnp.zeros_like(state.micro_steps))

    def wait():
      return zeros, Accumulation(state.inner, loss, grads, tokens, state.micro_steps + 1)

    return jax.lax.cond(state.micro_steps + 1 >= every_k, apply, wait)

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(c: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Warmup then cosine/constant, clipping on the trainable tree, gradient accumulation."""
  if c.decay == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, c.warmup_steps,
                                                  max(c.total_steps, c.warmup_steps + 1), end_value=0.1 * c.learning_rate)
  elif c.decay == "constant":
    schedule = optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, max(c.warmup_steps, 1)),
                                     optax.constant_schedule(c.learning_rate)], [max(c.warmup_steps, 1)])
  else:
    raise ValueError(f"optimizer decay {c.decay!r} is not supported; valid: cosine, constant")
  if c.name == "adamw":
    base = optax.adamw(schedule, weight_decay=c.weight_decay)
  elif c.name == "adafactor":
    base = optax.adafactor(schedule, weight_decay_rate=c.weight_decay or None)
  else:
    raise ValueError(f"optimizer {c.name!r} is not supported; valid: adamw, adafactor")
  tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), base)
  if c.grad_accum_steps > 1:
    tx = accumulate_by_tokens(tx, c.grad_accum_steps)
  return tx, schedule


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh: Mesh, trainable, opt_state, frozen):
  """The jitted step `(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`.

  Shardings: prompts and optimizer state replicated, frozen weights by their logical axes, batch
  rows over `data`. Trainable and optimizer state are donated (updated in place). With gradient
  accumulation the metrics cover the accumulated step so far: on its last micro-batch, the whole step.
  """
  rep = sharding.replicated(mesh)

  def step(trainable, opt_state, frozen, batch):
    def loss_fn(trainable):
      return loss_and_count(nnx.merge(graphdef, trainable, frozen), batch)

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    if isinstance(opt_state, Accumulation):
      metrics = accumulate(opt_state, loss, grads, count)
      updates, opt_state = tx.update(grads, opt_state, trainable, loss=loss, tokens=count)
      loss, grads, count = metrics
    else:
      updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads)}

  in_shardings = (rep, rep, sharding.state_shardings(frozen, mesh), sharding.batch_sharding(mesh))
  return jax.jit(step, in_shardings=in_shardings, out_shardings=(rep, rep, rep), donate_argnums=(0, 1))


def make_eval_step(graphdef, mesh: Mesh, frozen):
  """Jitted `(trainable, frozen, batch) -> (sum of target NLL, target count)` for dev loss / perplexity."""
  rep = sharding.replicated(mesh)

  def step(trainable, frozen, batch):
    nll, mask = nnx.merge(graphdef, trainable, frozen).token_losses(batch)
    return (nll * mask).sum(), mask.sum()

  return jax.jit(step, in_shardings=(rep, sharding.state_shardings(frozen, mesh), sharding.batch_sharding(mesh)),
                 out_shardings=(rep, rep))


def place(tree: Any, shardings: Any):
  """Puts a host tree on devices with the given shardings (a prefix tree is fine)."""
  return jax.device_put(tree, shardings)
