"""The original MSP code's downstream protocol: a language model that WRITES an utterance's labels.

The original fully fine-tuned a seq2seq model (GODEL) to map the raw utterance to a label string
(ORIGINAL.md §3.2, §4.7), or trained a soft prompt for it with the model frozen (its `soft_prompt`
task, §3.3), greedy-decoded the dev split after every epoch, post-processed the strings (§8.2) and
kept the best epoch. Here the same with a decoder-only backbone:

  input   "{utterance}<label>" (the original's GPT layout, §5.4)
  target  NLU++ "booking;refund;when" (";"-joined sorted intent names)
          CrossNER "Stade de France [location] <sep> 2003 World Championships [event]" ("" if none)
          + EOS; the loss covers the target tokens only
  params  "prompt": a 20-token soft prompt before the input, backbone frozen (cheap);
          "full": that prompt and every backbone parameter

`LabelGenerator` trains and decodes strings; `IntentStrings` / `EntityStrings` format label strings
and parse decoded ones back into the ontology's labels, the original's normalisation included.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msp_jax import checkpoints, provenance, sampling, sharding, training
from msp_jax.assembly import embedding_table
from msp_jax.data.batching import BatchConfig, make_batch, pad_id, row_length
from msp_jax.data.iterator import length_grouped
from msp_jax.data.layout import Segments
from msp_jax.errors import MspError
from msp_jax.metrics.task_scores import normalize_original
from msp_jax.mixers import PromptParam
from msp_jax.prompts import PLAIN, SoftPrompts, init_instruction

SEPARATOR = "<label>"         # between the utterance and its label string (the original's GPT layout)
INTENT_SEPARATOR = ";"
ENTITY_SEPARATOR = " <sep> "
PROMPT_TOKENS = 20            # the soft prompt before the input (the grid's MSP prompts are 20 tokens too)
PROMPT_TEXT = "Write the labels of this utterance:"  # the prompt starts as this text's embeddings
DECODE_BATCH = 64             # rows per greedy decoding call (static: one compilation per prompt bucket)
SHRINK_EVERY = 16             # steps between moving the rows still writing into a smaller batch (`sampling.generate`)
END_STRINGS = ("<pad>", "</s>", "<|endoftext|>", "<|im_end|>")  # the original cut at the first one past index 0
PARAMS = ("prompt", "full")


class FinetuneError(MspError):
  """A fine-tuning setting that cannot work; the message names the field."""


# --- label strings ----------------------------------------------------------------------------------

def postprocess(text: str) -> str:
  """The original's `postprocess_outputs` steps 1-2: newlines become " | ", the string is cut at the
  first end token found past its start, and stripped."""
  text = text.replace("\n", " | ")
  cuts = [i for i in (text.find(end) for end in END_STRINGS) if i > 0]
  return (text[:min(cuts)] if cuts else text).strip()


class IntentStrings:
  """NLU++: intents <-> "a;b;c". Parsing splits on ";", normalises each piece as the original did
  (lowercase, punctuation and "_" to spaces, no articles, 7 tokens) and maps it to the intent whose
  normalised name it equals; an unknown piece is dropped and counted."""

  def __init__(self, intents: Sequence[str]):
    self.lookup = {normalize_original(n): n for n in intents}
    if len(self.lookup) != len(intents):
      raise FinetuneError(f"intent names {sorted(intents)} are not distinct after the original's normalisation")

  @staticmethod
  def format(intents) -> str:
    return INTENT_SEPARATOR.join(sorted(intents))

  def parse(self, text: str) -> tuple[set[str], int]:
    """(intents, number of unknown pieces) of a decoded string."""
    found, unknown = set(), 0
    for piece in postprocess(text).split(INTENT_SEPARATOR):
      key = normalize_original(piece)
      if not key:  # the empty label string: no intent
        continue
      if key in self.lookup:
        found.add(self.lookup[key])
      else:
        unknown += 1
    return found, unknown


_ENTITY = re.compile(r"^(.*?)\s*\[([^\[\]]*)\]$")


class EntityStrings:
  """CrossNER: [(type, entity text)] <-> "entity [type] <sep> entity [type]". Parsing splits on
  "<sep>"; each piece must read "entity [type]" with a type that, normalised as the original did,
  is one of the ontology's; otherwise it is dropped and counted. The entity text is kept as written
  (`locate` finds it in the utterance for exact span F1; the original's score normalises it itself)."""

  def __init__(self, types: Sequence[str]):
    self.lookup = {normalize_original(t): t for t in types}
    if len(self.lookup) != len(types):
      raise FinetuneError(f"entity types {sorted(types)} are not distinct after the original's normalisation")

  @staticmethod
  def format(entities: Sequence[tuple[str, str]]) -> str:
    return ENTITY_SEPARATOR.join(f"{text} [{kind}]" for kind, text in entities)

  def parse(self, text: str) -> tuple[list[tuple[str, str]], int]:
    """([(type, entity text)], number of dropped pieces) of a decoded string."""
    found, dropped = [], 0
    for piece in postprocess(text).split(ENTITY_SEPARATOR.strip()):
      piece = piece.strip()
      if not piece:  # the empty label string: no entity
        continue
      m = _ENTITY.match(piece)
      kind = self.lookup.get(normalize_original(m.group(2))) if m else None
      if kind is None or not m.group(1):
        dropped += 1
      else:
        found.append((kind, m.group(1)))
    return found, dropped


def locate(text: str, entities: Sequence[tuple[str, str]]) -> list[tuple[str, int, int]]:
  """Word spans (type, start, end) of predicted entities in `text`, exact, else case-insensitive. Label
  strings list entities in sentence order, so each is looked for first after the previous one found, then
  anywhere; never on words an earlier entity took ("France" after "Stade de France [location]" is the
  later France). An entity not in the text gets (type, -1, -1): a false positive in exact span F1 (it
  can never equal a gold span)."""
  words = text.split()
  taken, spans, after = set(), [], 0
  for kind, entity in entities:
    target = entity.split()
    where = None
    for fold in (lambda w: w, str.lower):
      starts = [i for i in range(len(words) - len(target) + 1)
                if [fold(w) for w in words[i:i + len(target)]] == [fold(w) for w in target]
                and not taken & set(range(i, i + len(target)))]
      if starts:
        where = next((i for i in starts if i >= after), starts[0])
        break
    if where is None:
      spans.append((kind, -1, -1))
    else:
      taken |= set(range(where, where + len(target)))
      after = where + len(target)
      spans.append((kind, where, after))
  return spans


# --- the text-to-label model ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  params: str = "prompt"            # prompt | full
  epochs: int = 5
  learning_rate: float = 3e-2
  batch_size: int = 8
  max_new_tokens: int = 256         # a cap: decoding writes at most 1.25x the longest training label string
  repetition_penalty: float = 1.2   # the original's --threshold in run.sh
  warmup_fraction: float = 0.1      # the original: warm-up over 10% of the steps, then cosine
  # NLU++ rows (utterance, label string, EOS) are 10-68 tokens, CrossNER's 30-390: fine steps at the short end
  buckets: tuple[int, ...] = (16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 384, 512)
  # Batches of rows of similar length, in random order: random batches of 8 were 50% padding (NLU++ banking,
  # CrossNER politics seeds), grouped ones 24-25%.
  group_by_length: bool = True
  seed: int = 0

  def check(self, field_prefix: str = "finetune_") -> None:
    fail = lambda field, value, why: FinetuneError(f"config.{field_prefix}{field}={value!r}: {why}")
    if self.params not in PARAMS:
      raise fail("params", self.params, f"valid: {', '.join(PARAMS)}")
    for field in ("epochs", "batch_size", "max_new_tokens"):
      if getattr(self, field) < 1:
        raise fail(field, getattr(self, field), "must be >= 1")
    if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise fail("lr", self.learning_rate, "must be a finite number > 0")
    if not self.repetition_penalty > 0:
      raise fail("repetition_penalty", self.repetition_penalty, "must be > 0 (1.0 = off)")


def row_segments(uid: int, text: str, target: str | None) -> Segments:
  """One row of the layout: "{utterance}<label>", then the label string (training) or nothing (decoding)."""
  return Segments(uid=str(uid), attribute_ids=(), domain_id=0, text=text + SEPARATOR, target=target)


class LabelGenerator:
  """A causal LM that writes label strings; `fit` keeps the parameters of the epoch with the best
  dev score (ties: the earlier epoch), chosen by `dev_score(decoded dev strings)` alone."""

  def __init__(self, backbone, config: FinetuneConfig):
    config.check()
    if backbone.is_encoder_decoder:
      raise FinetuneError(f"config.downstream='finetune' needs a decoder-only backbone; {backbone.source} is "
                          f"{backbone.model_type}")
    self.backbone, self.config, self.tokenizer = backbone, config, backbone.tokenizer
    instruction = init_instruction("text", PROMPT_TOKENS, embedding_table(backbone.model), self.tokenizer, text=PROMPT_TEXT)
    model = training.PromptedModel(backbone.model, SoftPrompts(instruction, {}, PLAIN, rngs=nnx.Rngs(config.seed)),
                                   encoder_decoder=False)
    # full: every nnx.Param (the backbone's and the prompt, a PromptParam subclass) is trained
    self.graphdef, trainable, self.frozen = nnx.split(model, nnx.Param if config.params == "full" else PromptParam, ...)
    # the train step donates what it trains: never the backbone's own arrays, which the grid shares
    self.trainable = jax.tree.map(jnp.copy, trainable)
    self.batch_config = BatchConfig(buckets=config.buckets)
    self.mesh = sharding.make_mesh()
    self.history: list[dict] = []
    self.selection: dict | None = None
    self.new_tokens = config.max_new_tokens  # fit() sets it from the training label strings

  # batches
  def batch(self, texts: Sequence[str], targets: Sequence[str] | None = None, rows: int | None = None) -> dict:
    """Model arrays of texts (and targets), filled to `rows` rows with copies of the first that carry no loss."""
    n = len(texts)
    rows = rows or n
    index = list(range(n)) + [0] * (rows - n)
    segments = [row_segments(i, texts[i], None if targets is None else targets[i]) for i in index]
    batch = make_batch(segments, self.tokenizer, self.batch_config)
    batch["loss_mask"][n:] = False
    return {k: jnp.asarray(v) for k, v in batch.items() if k in training.MODEL_KEYS}

  def model(self, trainable=None) -> training.PromptedModel:
    return nnx.merge(self.graphdef, self.trainable if trainable is None else trainable, self.frozen)

  def loss(self, batch) -> float:
    """Mean NLL per target token of a batch (the training loss)."""
    return float(training.loss_and_count(self.model(), batch)[0])

  # training
  def fit(self, texts: Sequence[str], targets: Sequence[str], dev_texts: Sequence[str],
          dev_score: Callable[[list[str]], float], on_epoch: Callable[[dict], None] | None = None,
          checkpoint_dir: str | None = None, run_key: dict | None = None):
    """Trains `epochs` epochs, scoring the decoded dev strings after each, and keeps the best epoch.

    With `checkpoint_dir`, each epoch's state (trainable parameters, optimizer, history) is saved in
    `{checkpoint_dir}/checkpoints`, keeping the best epoch and the latest. A fit killed part-way (a CPU
    politics row takes hours) then resumes after its last saved epoch and reaches the parameters an
    unbroken fit would have; a finished one only restores its best epoch. The state is keyed by the
    config, the backbone, the texts and `run_key` (what else `dev_score` depends on): a state made from
    anything else is moved aside with a notice (`provenance.reusable`), never resumed."""
    c = self.config
    self.new_tokens = self.decode_length(targets)
    steps_per_epoch = -(-len(texts) // c.batch_size)
    total = c.epochs * steps_per_epoch
    tx, _ = training.make_optimizer(training.OptimizerConfig(learning_rate=c.learning_rate, total_steps=total,
                                                             warmup_steps=int(c.warmup_fraction * total)))
    opt_state = tx.init(self.trainable)
    step = training.make_train_step(self.graphdef, tx, self.mesh, self.trainable, opt_state, self.frozen)
    rng = np.random.default_rng([c.seed, 13])
    lengths = [row_length(row_segments(i, t, y), self.tokenizer) for i, (t, y) in enumerate(zip(texts, targets))]
    store, done = None, 0
    if checkpoint_dir:
      key = {"config": dataclasses.asdict(c), "backbone": self.backbone.source, "run_key": run_key or {},
             "data": provenance.stable_key({"texts": list(texts), "targets": list(targets), "dev": list(dev_texts)})}
      store, done, opt_state = self._resume(checkpoint_dir, key, opt_state)
    best = None
    for epoch in range(1, c.epochs + 1):
      order = rng.permutation(len(texts))
      if c.group_by_length:
        order = length_grouped(order, lengths.__getitem__, c.batch_size, rng)
      if epoch <= done:
        continue  # saved before a restart; its order is drawn all the same, so later epochs get theirs
      losses, start_time = [], time.perf_counter()
      for start in range(0, len(texts), c.batch_size):
        rows = order[start:start + c.batch_size]
        batch = self.batch([texts[i] for i in rows], [targets[i] for i in rows], c.batch_size)
        self.trainable, opt_state, metrics = step(self.trainable, opt_state, self.frozen, batch)
        losses.append(float(metrics["loss"]))  # float() waits for the step: the time below is the real one
      trained = time.perf_counter()
      score = float(dev_score(self.generate(dev_texts)))
      self.history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "dev_score": score,
                           "train_seconds": round(trained - start_time, 2),
                           "dev_seconds": round(time.perf_counter() - trained, 2)})  # both with the first call's compile
      if store is not None:
        store.save(epoch, {"trainable": self.trainable, "opt_state": opt_state},
                   {"metrics": {"dev_score": score}, "history": self.history})
      elif best is None or score > best[0]:
        best = (score, epoch, jax.tree.map(jnp.copy, self.trainable))  # the next step donates the live copy
      if on_epoch is not None:
        on_epoch(self.history[-1])
    if store is not None:  # the best epoch is on disk (ties: the earlier one, as above)
      epoch = store.best_step()
      if epoch != store.latest_step():  # the whole state: this manager saved it whole (a part restore needs another)
        state = {"trainable": self.trainable, "opt_state": opt_state}
        self.trainable = store.restore(epoch, checkpoints.abstract(state))[0]["trainable"]
      best = (self.history[epoch - 1]["dev_score"], epoch, self.trainable)
      store.close()
    score, epoch, self.trainable = best
    self.selection = {"epochs": epoch, "dev_score": score, "dev_examples": len(dev_texts), "history": self.history}
    return self

  def _resume(self, checkpoint_dir: str, key: dict, opt_state) -> tuple[checkpoints.Checkpoints, int, object]:
    """(the epoch store, the epochs already done, the optimizer state to go on from); restores the
    trainable parameters and the history of the newest intact epoch of a state made from `key`."""
    folder = os.path.join(checkpoint_dir, "checkpoints")
    if not provenance.reusable(folder, key, f"fine-tuning state {checkpoint_dir}"):
      provenance.write_key(folder, key)
    store = checkpoints.Checkpoints(checkpoint_dir, metric="dev_score", minimize=False, keep_best=1)
    state = {"trainable": self.trainable, "opt_state": opt_state}
    newest = store.restore_newest_intact(checkpoints.abstract(state))
    if newest is None:
      return store, 0, opt_state
    done, state, meta = newest
    self.trainable, self.history = state["trainable"], meta["history"]
    print(f"  finetune: resuming after epoch {done}/{self.config.epochs} ({folder})", flush=True)
    return store, done, state["opt_state"]

  # decoding
  def decode_length(self, targets: Sequence[str]) -> int:
    """New tokens a decode may write: 1.25x the longest training label string with its EOS, in steps of
    8, at most `max_new_tokens`. The original decoded `target_max_len` (128) tokens for every task; here
    NLU++ label strings take 7-35 tokens and CrossNER's 20-240, so one fixed length either cuts CrossNER
    or lets an early epoch's NLU++ model ramble for 100 tokens before its dev score."""
    longest = max(len(ids) for ids in self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]) + 1
    return min(self.config.max_new_tokens, -(-int(1.25 * longest) // 8) * 8)

  def generate(self, texts: Sequence[str]) -> list[str]:
    """Greedy label strings of `texts` (the original: greedy with a repetition penalty). The penalty counts
    the label string's own tokens only: the original's GODEL, an encoder-decoder, penalised its decoder's,
    and a label string copies its utterance's words (CrossNER's entities) and `<sep>` (in the prompt's
    `<label>`). Rows are decoded in order of length: each call's prompts share a short bucket and its rows
    end at similar steps."""
    if not texts:
      return []
    c, eos = self.config, self.tokenizer.eos_token_id
    config = sampling.DecodeConfig(max_new_tokens=self.new_tokens, repetition_penalty=c.repetition_penalty,
                                   penalize_prompt=False, eos_ids=(eos,), pad_id=pad_id(self.tokenizer))
    model = self.model()
    lengths = [len(ids) for ids in self.tokenizer([t + SEPARATOR for t in texts], add_special_tokens=False)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    out = [""] * len(texts)
    for start in range(0, len(texts), DECODE_BATCH):
      rows = order[start:start + DECODE_BATCH]
      batch = self.batch([texts[i] for i in rows], rows=DECODE_BATCH)
      prefix, prefix_mask = model.prompts(batch["attribute_ids"], batch["attribute_mask"])
      new = np.asarray(sampling.generate(model.backbone, batch["input_ids"], batch["attention_mask"], config,
                                         embedded_prefix=prefix, prefix_mask=prefix_mask, shrink_every=SHRINK_EVERY))
      for i, row in zip(rows, new):
        ends = np.flatnonzero(row == eos)
        out[i] = self.tokenizer.decode(row[:ends[0] if len(ends) else len(row)].tolist(), skip_special_tokens=False)
    return out
