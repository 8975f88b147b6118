"""Downstream few-shot models of the MSP experiment, on frozen backbone features.

The backbone stays frozen and only a small head (linear, or one hidden layer) is trained with
AdamW, so comparing training sets (seed data alone vs seed + generated) costs seconds per run.
Intents (NLU++, TOPv2) are multi-label: sigmoid per label on pooled sentence features
(`features.text_embeddings`). CrossNER is BIO tagging on per-word features
(`features.token_features`). Everything is deterministic given `seed`: the init key and the
numpy shuffling both come from it. `fit_selected` chooses the L2 strength, the number of steps (early
stopping) and, for multi-label heads, the decision threshold on a dev split (`SelectionGrid`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from msp_jax.metrics import task_scores
from msp_jax.data.example import Example


class _Head(nnx.Module):
  """Linear, or Linear-ReLU-Linear when `hidden` > 0."""

  def __init__(self, d_in: int, hidden: int, d_out: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(d_in, hidden, rngs=rngs) if hidden else None
    self.out = nnx.Linear(hidden or d_in, d_out, rngs=rngs)

  def __call__(self, x):  # [N, D] -> [N, d_out]
    if self.hidden is not None:
      x = jax.nn.relu(self.hidden(x))
    return self.out(x)


def _bce(logits, y):
  return optax.sigmoid_binary_cross_entropy(logits, y).mean()


def _cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _l2(model) -> jax.Array:
  """Sum of squared weight matrices (biases free)."""
  return sum(jnp.sum(p[...] ** 2) for path, p in nnx.iter_graph(model) if isinstance(p, nnx.Param) and path[-1] == "kernel")


@functools.partial(nnx.jit, static_argnames=("loss_fn",))
def _train_step(model, optimizer, x, y, idx, l2, loss_fn):
  if idx is not None:  # a minibatch gathered on device: the data is sent once, not every step
    x, y = x[idx], y[idx]
  loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), y) + l2 * _l2(m))(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _logits(model, x):
  return model(x)


@dataclasses.dataclass(frozen=True)
class SelectionGrid:
  """What `fit_selected` chooses on the dev split, per run (the test split never enters selection).

  Each L2 strength is trained once for the trainer's `steps`; every `eval_every` steps (and at the
  last) the dev score is taken and the best (l2, step) snapshot is kept: early stopping on dev.
  Multi-label heads also pick their decision threshold on dev at each snapshot. Ties keep the
  earlier candidate (L2 in grid order, then fewer steps) and the threshold nearest 0.5. With `patience`
  n > 0 an L2's training stops once n dev scores in a row have not beaten its own best (0: all steps).
  """
  l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
  eval_every: int = 50
  thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  patience: int = 0

  def __post_init__(self):
    if not self.l2 or min(self.l2) < 0 or self.eval_every < 1 or not self.thresholds \
        or not all(0 < t < 1 for t in self.thresholds) or self.patience < 0:
      raise ValueError(f"SelectionGrid: need L2 values >= 0, eval_every >= 1, thresholds in (0, 1) and patience "
                       f">= 0; got {self}")


@dataclasses.dataclass(eq=False)
class _Trainer:
  """Shared hyperparameters and fitting of a head on standardized features."""
  hidden: int = 0               # 0: linear head
  steps: int = 300
  learning_rate: float = 1e-2
  weight_decay: float = 0.0
  # A few-shot set is linearly separable in D=576 features: without an L2 penalty in the loss the
  # weights grow without bound along directions that separate the seeds by chance, and AdamW's
  # decoupled weight decay is too weak to stop it. Its strength is chosen on dev (`fit_selected`).
  l2: float = 1e-3
  batch_size: int = 0           # 0 (or >= N): full batch
  seed: int = 0
  model: Any = dataclasses.field(default=None, init=False, repr=False)
  mean: Any = dataclasses.field(default=None, init=False, repr=False)
  std: Any = dataclasses.field(default=None, init=False, repr=False)
  selection: dict | None = dataclasses.field(default=None, init=False)  # what fit_selected chose, with its dev score

  def _select(self, fit: Callable, dev_score: Callable, grid: SelectionGrid, metric: str) -> None:
    """For each L2 in the grid, `fit(trainer, on_eval)` trains a copy that calls `on_eval(step)`, which
    returns True to stop (`grid.patience`); `dev_score(trainer)` -> (score, other choices). Keeps the
    best snapshot as this trainer's model."""
    best = None
    for l2 in grid.l2:
      trainer = dataclasses.replace(self, l2=l2)
      own = {"best": -np.inf, "since": 0}  # this L2's best dev score, and the dev scores since it

      def on_eval(step, trainer=trainer, l2=l2, own=own) -> bool:
        nonlocal best
        score, chosen = dev_score(trainer)
        if best is None or score > best[0]:
          best = (score, {"l2": l2, "steps": step, **chosen}, nnx.clone(trainer.model), trainer.mean, trainer.std)
        if score > own["best"]:
          own.update(best=score, since=0)
        else:
          own["since"] += 1
        return 0 < grid.patience <= own["since"]

      fit(trainer, on_eval)
    score, chosen, self.model, self.mean, self.std = best
    self.l2 = chosen["l2"]
    self.selection = {**chosen, "dev_metric": metric, "dev_score": float(score)}

  def _fit(self, x: np.ndarray, y: np.ndarray, d_out: int, loss_fn, on_eval: Callable | None = None,
           eval_every: int = 0) -> None:
    # Backbone features have a few huge dimensions; standardizing lets one learning rate fit all.
    self.mean = x.mean(0)
    self.std = np.maximum(x.std(0), 1e-6)
    xs = jnp.asarray((x - self.mean) / self.std, jnp.float32)
    ys = jnp.asarray(y)
    self.model = _Head(x.shape[1], self.hidden, d_out, nnx.Rngs(self.seed))
    optimizer = nnx.Optimizer(self.model, optax.adamw(self.learning_rate, weight_decay=self.weight_decay),
                              wrt=nnx.Param)
    n = len(x)
    b = n if self.batch_size <= 0 or self.batch_size >= n else self.batch_size
    rng, order = np.random.default_rng(self.seed), np.zeros(0, np.int64)
    for step in range(1, self.steps + 1):
      idx = None
      if b < n:  # fixed-size batches from reshuffled epochs: one compile
        if len(order) < b:
          order = np.concatenate([order, rng.permutation(n)])
        idx, order = jnp.asarray(order[:b]), order[b:]
      _train_step(self.model, optimizer, xs, ys, idx, self.l2, loss_fn)
      if on_eval is not None and (step % eval_every == 0 or step == self.steps) and on_eval(step):
        break  # early stopping (SelectionGrid.patience)

  def _forward(self, x: np.ndarray) -> np.ndarray:
    if self.model is None:
      raise ValueError(f"{type(self).__name__}: call fit before predict")
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != len(self.mean):
      raise ValueError(f"{type(self).__name__}: features have shape {x.shape}; expected [N, {len(self.mean)}]")
    return np.asarray(_logits(self.model, jnp.asarray((x - self.mean) / self.std, jnp.float32)))


@dataclasses.dataclass(eq=False)
class MultiLabelClassifier(_Trainer):
  """Independent sigmoid per label (sigmoid BCE); a label is predicted when its probability > threshold.

  0.5 is the Bayes threshold for calibrated probabilities, but an L2-penalised few-shot head is not
  calibrated: `fit_selected` chooses the threshold on dev. A row with no label above it predicts
  the empty set (NLU++ utterances without intents).
  """
  threshold: float = 0.5

  @staticmethod
  def _checked(X: np.ndarray, Y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    X, Y = np.asarray(X, np.float32), np.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
      raise ValueError(f"MultiLabelClassifier.{where}: X {X.shape} and Y {Y.shape} must be [N, D] and [N, L]")
    if not np.isin(Y, (0, 1)).all():
      raise ValueError(f"MultiLabelClassifier.{where}: Y must hold only 0 and 1")
    return X, Y.astype(np.float32)

  def fit(self, X: np.ndarray, Y: np.ndarray) -> "MultiLabelClassifier":
    """X [N, D] features, Y [N, L] 0/1 targets (rows may be all zero)."""
    X, Y = self._checked(X, Y, "fit")
    self._fit(X, Y, Y.shape[1], _bce)
    return self

  def fit_selected(self, X: np.ndarray, Y: np.ndarray, X_dev: np.ndarray, Y_dev: np.ndarray,
                   grid: SelectionGrid = SelectionGrid(), metric: str = "micro_f1", columns: Sequence[int] | None = None,
                   name: str | None = None) -> "MultiLabelClassifier":
    """`fit` with L2, steps and threshold chosen by `metric` on (X_dev, Y_dev) over `grid`.

    metric: micro_f1 (labels pooled over rows) or set_accuracy (rows whose label set is exactly
    right), over the label `columns` only when given (e.g. NLU++'s general intents). The choice and its
    dev score are in `selection`, under `name` (default: metric)."""
    X, Y = self._checked(X, Y, "fit_selected")
    X_dev, Y_dev = self._checked(X_dev, Y_dev, "fit_selected (dev)")
    if metric not in MULTILABEL_METRICS:
      raise ValueError(f"MultiLabelClassifier.fit_selected: metric {metric!r}; valid: {', '.join(MULTILABEL_METRICS)}")
    keep = slice(None) if columns is None else np.asarray(columns, np.int64)
    gold, score_fn = Y_dev.astype(bool)[:, keep], MULTILABEL_METRICS[metric]

    def dev_score(trainer):
      probs = trainer.probabilities(X_dev)[:, keep]
      score, _, threshold = max((score_fn(gold, probs > t), -abs(t - 0.5), t) for t in grid.thresholds)
      return score, {"threshold": threshold}

    self._select(lambda trainer, on_eval: trainer._fit(X, Y, Y.shape[1], _bce, on_eval, grid.eval_every),
                 dev_score, grid, name or metric)
    self.threshold = self.selection["threshold"]
    return self

  def probabilities(self, X: np.ndarray) -> np.ndarray:
    """[N, L] float32 probability of each label."""
    return np.asarray(jax.nn.sigmoid(self._forward(X)))

  def predict(self, X: np.ndarray) -> np.ndarray:
    """[N, L] bool: which labels each row has."""
    return self.probabilities(X) > self.threshold


@dataclasses.dataclass(eq=False, kw_only=True)
class BIOTagger(_Trainer):
  """Softmax over BIO tags for each word on its own features (no context beyond the backbone's).

  Words are classified independently, so training flattens all sentences into one word matrix:
  the same loss as a cross-entropy masked over padded words, without the padding. With `repair`,
  decoding turns an I-x that does not continue an x entity (after O, after another type, or first)
  into B-x, so every predicted entity starts with B, as the tagging scheme requires.
  """
  tags: Sequence[str]  # tag names by id, e.g. from `data.spans.bio_labels`
  repair: bool = True

  def __post_init__(self):
    bad = [t for t in self.tags if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2)]
    if bad:
      raise ValueError(f"BIOTagger: tags {bad} are not 'O', 'B-<type>' or 'I-<type>'")

  def fit(self, features: Sequence[np.ndarray], tag_ids: Sequence[Sequence[int]], on_eval: Callable | None = None,
          eval_every: int = 0, word_mask: Sequence[Sequence[bool]] | None = None) -> "BIOTagger":
    """features: per sentence [n_i, D]; tag_ids: per sentence n_i ids into `tags`. `on_eval(step)` is
    called every `eval_every` steps (for `fit_selected`). `word_mask` (per sentence n_i bools): words
    marked False are out of the loss (words are classified independently, so that is dropping them)."""
    if len(features) != len(tag_ids):
      raise ValueError(f"BIOTagger.fit: {len(features)} feature arrays but {len(tag_ids)} tag lists")
    for i, (f, t) in enumerate(zip(features, tag_ids)):
      if len(f) != len(t):
        raise ValueError(f"BIOTagger.fit: sentence {i} has {len(f)} word features but {len(t)} tags")
      if word_mask is not None and len(word_mask[i]) != len(t):
        raise ValueError(f"BIOTagger.fit: sentence {i} has {len(t)} tags but {len(word_mask[i])} word_mask entries")
    y = np.concatenate([np.asarray(t, np.int32).reshape(-1) for t in tag_ids])
    if len(y) == 0 or y.min() < 0 or y.max() >= len(self.tags):
      raise ValueError(f"BIOTagger.fit: tag ids must be in [0, {len(self.tags)}) and there must be words")
    x = np.concatenate([np.asarray(f, np.float32) for f in features if len(f)])
    if word_mask is not None:
      keep = np.concatenate([np.asarray(m, bool).reshape(-1) for m in word_mask])
      if not keep.any():
        raise ValueError("BIOTagger.fit: word_mask leaves no word to train on")
      x, y = x[keep], y[keep]
    self._fit(x, y, len(self.tags), _cross_entropy, on_eval, eval_every)
    return self

  def fit_selected(self, features: Sequence[np.ndarray], tag_ids: Sequence[Sequence[int]],
                   dev_features: Sequence[np.ndarray], dev_tag_ids: Sequence[Sequence[int]],
                   grid: SelectionGrid = SelectionGrid(), word_mask: Sequence[Sequence[bool]] | None = None) -> "BIOTagger":
    """`fit` with L2 and steps chosen by exact span F1 on the dev sentences over `grid` (its
    thresholds do not apply). The choice and its dev score are in `selection`."""
    if len(dev_features) != len(dev_tag_ids):
      raise ValueError(f"BIOTagger.fit_selected: {len(dev_features)} dev feature arrays but {len(dev_tag_ids)} tag lists")
    gold = [task_scores.bio_to_spans([self.tags[i] for i in row]) for row in dev_tag_ids]

    def dev_score(trainer):
      pred = [task_scores.bio_to_spans([self.tags[i] for i in row]) for row in trainer.predict(dev_features)]
      return task_scores.span_f1(gold, pred)["f1"], {}

    self._select(lambda trainer, on_eval: trainer.fit(features, tag_ids, on_eval, grid.eval_every, word_mask), dev_score,
                 grid, "span_f1")
    return self

  def predict(self, features: Sequence[np.ndarray]) -> list[list[int]]:
    """Tag ids per word of each sentence."""
    sizes = [len(f) for f in features]
    nonempty = [np.asarray(f, np.float32) for f in features if len(f)]
    best = self._forward(np.concatenate(nonempty)).argmax(-1) if nonempty else np.zeros(0, np.int64)
    ids = {t: i for i, t in enumerate(self.tags)}
    out, start = [], 0
    for n in sizes:
      row = [int(i) for i in best[start:start + n]]
      start += n
      if self.repair:
        row = [ids.get(t, ids.get("O", 0)) for t in repair_bio([self.tags[i] for i in row])]
      out.append(row)
    return out


def _micro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
  """Micro F1 of [N, L] bool matrices, with `task_scores.multilabel_prf`'s conventions."""
  tp, fp, fn = int((gold & pred).sum()), int((~gold & pred).sum()), int((gold & ~pred).sum())
  return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _set_accuracy(gold: np.ndarray, pred: np.ndarray) -> float:
  return float((gold == pred).all(1).mean()) if len(gold) else float("nan")


MULTILABEL_METRICS = {"micro_f1": _micro_f1, "set_accuracy": _set_accuracy}


def repair_bio(tags: Sequence[str]) -> list[str]:
  """Each I-x that does not follow B-x or I-x becomes B-x; other tags are kept."""
  out, prev = [], "O"
  for t in tags:
    if t.startswith("I-") and prev[2:] != t[2:]:
      t = "B-" + t[2:]
    out.append(t)
    prev = t
  return out


def intent_targets(examples: Sequence[Example | Mapping[str, Any]], labels: Sequence[str],
                   set_name: str = "intents") -> np.ndarray:
  """[N, L] float32 multi-hot of each example's `attributes[set_name]` over `labels`.

  Takes Examples or generated records (dicts with "attributes"). A name outside `labels` is an
  error, not silently dropped: restrict examples first (`Example.restricted`) if that is intended.
  """
  index = {name: j for j, name in enumerate(labels)}
  out = np.zeros((len(examples), len(labels)), np.float32)
  for i, e in enumerate(examples):
    attributes = e.attributes if isinstance(e, Example) else e["attributes"]
    uid = f"example {e.uid}" if isinstance(e, Example) else f"record {i}"
    if set_name not in attributes:
      raise ValueError(f"{uid}: no attribute set {set_name!r}; it has {sorted(attributes)}")
    for name in attributes[set_name]:
      if name not in index:
        raise ValueError(f"{uid}: {set_name} name {name!r} is not among the {len(labels)} labels")
      out[i, index[name]] = 1.0
  return out
