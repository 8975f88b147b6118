"""Host-side batch iterator: seeded order per epoch, process sharding, a resumable position.

Every process walks the same global order (a permutation of the split from (seed, epoch)) and keeps
its own contiguous slice of each global batch, so `process_count` hosts together see each example of
an epoch once, in batches of one shape. Exemplars are drawn with a generator seeded by (seed, epoch, example index): the
batches depend only on the seed and the position, which is all a checkpoint needs to store
(`get_state` / `set_state`).

With `group_by_length` (training) each epoch's kept examples are sorted by their row's token count
and cut into batches whose order is then shuffled: every batch still holds a random epoch's examples
once, but rows of one batch have similar lengths, so the bucketed length T wastes less on padding
(NLU++ hotels rows are 36-73 tokens from p10 to p90: random batches of 8 mostly pad to the 128 bucket).
With `group_by_slots` as well the sort key is (attribute-axis bucket, length), `batching.padding_key`:
for the concat mixer, whose prefix is `attribute_tokens` per attribute slot, the slots pad more than the tokens.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from msp_jax.data.batching import BatchConfig, make_batch, padding_key
from msp_jax.data.example import Example
from msp_jax.data.layout import PromptLayout, Segments
from msp_jax.data.sources import DataError


class BatchIterator:
  """Batches of `examples`: global_batch_size rows per step, split over processes.

  shuffle=False keeps file order (evaluation). drop_remainder=False pads the last global batch with
  copies of its rows, marked False in `example_mask`, so every batch has the same shape.
  num_epochs=None repeats forever.
  """

  def __init__(self, examples: Sequence[Example], to_segments: Callable[[Example, np.random.Generator], Segments],
               tokenizer, *, global_batch_size: int, config: BatchConfig = BatchConfig(), seed: int = 0,
               num_epochs: int | None = 1, shuffle: bool = True, drop_remainder: bool = True,
               group_by_length: bool = False, group_by_slots: bool = False, process_index: int | None = None,
               process_count: int | None = None):
    if process_index is None or process_count is None:
      import jax  # only to ask which host this is
      process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
      raise DataError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
    if not examples:
      raise DataError("cannot iterate over an empty split")
    self.examples, self.to_segments, self.tokenizer, self.config = list(examples), to_segments, tokenizer, config
    self.global_batch_size, self.seed, self.num_epochs = global_batch_size, seed, num_epochs
    self.shuffle, self.drop_remainder, self.group_by_length = shuffle, drop_remainder, group_by_length
    self.group_by_slots = group_by_slots
    self._orders: dict[int, np.ndarray] = {}  # the last epoch's order (grouping tokenizes the whole epoch)
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.epoch, self.step = 0, 0  # the next batch is `step` of `epoch`
    if self.steps_per_epoch == 0:
      raise DataError(f"{len(self.examples)} examples make no full batch of {global_batch_size}; "
                      "lower global_batch_size or keep the remainder (drop_remainder=False)")

  @property
  def steps_per_epoch(self) -> int:
    full, rest = divmod(len(self.examples), self.global_batch_size)
    return full + (rest > 0 and not self.drop_remainder)

  def get_state(self) -> dict[str, int]:
    return {"seed": self.seed, "epoch": self.epoch, "step": self.step}

  def set_state(self, state: dict) -> None:
    if int(state["seed"]) != self.seed:
      raise DataError(f"iterator state has seed {state['seed']}, this iterator {self.seed}: batches would differ")
    self.epoch, self.step = int(state["epoch"]), int(state["step"])

  def order(self, epoch: int) -> np.ndarray:
    """The examples of `epoch` in batch order (a pure function of seed and epoch)."""
    n = len(self.examples)
    if not self.shuffle:
      return np.arange(n)
    if epoch not in self._orders:
      order = np.random.default_rng([self.seed, epoch]).permutation(n)
      if self.group_by_length:
        order = self._grouped(epoch, order)
      self._orders = {epoch: order}
    return self._orders[epoch]

  def _grouped(self, epoch: int, order: np.ndarray) -> np.ndarray:
    key = lambda i: padding_key(self.to_segments(self.examples[i], self.exemplar_rng(epoch, i)), self.tokenizer,
                                self.config, by_slots=self.group_by_slots)
    return length_grouped(order, key, self.global_batch_size, np.random.default_rng([self.seed, epoch, 1]))

  def exemplar_rng(self, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, epoch, int(index)])

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.step >= self.steps_per_epoch:
      self.epoch, self.step = self.epoch + 1, 0
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    batch = self.batch(self.epoch, self.step)
    self.step += 1
    return batch

  def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """This process's part of global batch `step` of `epoch` (pure: same arguments, same arrays).

    Every process builds the whole global batch and keeps its rows, so all agree on the padded
    length (jax.make_array_from_process_local_data needs equal shapes).
    """
    rows = self.order(epoch)[step * self.global_batch_size:(step + 1) * self.global_batch_size]
    real = np.arange(self.global_batch_size) < len(rows)
    rows = np.resize(rows, self.global_batch_size)  # repeats rows to fill a final partial batch
    segments = [self.to_segments(self.examples[i], self.exemplar_rng(epoch, i)) for i in rows]
    batch = make_batch(segments, self.tokenizer, self.config, example_mask=real)
    mine = slice(self.process_index * self.local_batch_size, (self.process_index + 1) * self.local_batch_size)
    return {name: array[mine] for name, array in batch.items()}


def length_grouped(order: np.ndarray, length: Callable[[int], int | tuple], batch_size: int,
                   rng: np.random.Generator) -> np.ndarray:
  """`order`'s full batches re-cut from their rows sorted by `length(row)` (a number or a tuple), in `rng`'s
  random batch order; the remainder (dropped, or the final partial batch) stays the same rows, last.
  Training on these pads a batch to its own rows' length instead of a random row's."""
  full = len(order) // batch_size * batch_size
  kept, rest = order[:full], order[full:]
  keys = [length(i) for i in kept]
  batches = kept[sorted(range(full), key=keys.__getitem__)].reshape(-1, batch_size)  # stable, as argsort's
  return np.concatenate([batches[rng.permutation(len(batches))].ravel(), rest])


def task_batches(task, split: str, tokenizer, *, global_batch_size: int, config: BatchConfig = BatchConfig(),
                 seed: int = 0, num_epochs: int | None = 1, shuffle: bool | None = None,
                 num_exemplars: int = 2, pool_size: int = 10, with_target: bool = True, group_by_length: bool = False,
                 group_by_slots: bool = False, process_index: int | None = None,
                 process_count: int | None = None) -> BatchIterator:
  """Batches of a task's split in the MSP prompt layout; exemplars always come from task's train split.

  Training (split "train") shuffles and drops the remainder (and groups rows by length if asked);
  dev/test keep order and pad.
  """
  if split not in task.splits:
    raise DataError(f"unknown split {split!r}; valid: {', '.join(task.splits)}")
  layout = PromptLayout(task.ontology, task.splits["train"], num_exemplars, pool_size)
  training = split == "train"
  return BatchIterator(task.splits[split], lambda ex, rng: layout.segments(ex, rng, with_target), tokenizer,
                       global_batch_size=global_batch_size, config=config, seed=seed, num_epochs=num_epochs,
                       shuffle=training if shuffle is None else shuffle, drop_remainder=training,
                       group_by_length=group_by_length and training, group_by_slots=group_by_slots,
                       process_index=process_index, process_count=process_count)
