"""The jitted decoding loop: prefill [prefix + prompt] once, then one token per iteration against
the KV cache inside a single `jax.lax.while_loop`, with a per-row done mask.

  config = DecodeConfig(max_new_tokens=40, do_sample=True, top_p=0.95, eos_ids=(tok.eos_token_id,))
  new = generate(model, input_ids, attention_mask, config, rng=key, embedded_prefix=prefix)  # [B * n, N]

Works for decoder-only models (left-padded prompts; the cache holds prefix + prompt) and for T5
(the encoder runs once; the decoder loop starts from `decoder_start_token_id`). Logits processors
follow Hugging Face semantics and order: repetition penalty, then (sampling only) temperature,
top-k, top-p. Beam search follows transformers' vectorised `_beam_search` step for step (top 2k
continuations, finished-hypothesis bank, length penalty, early-stopping heuristic). The decoding
config is static: one compilation per (config, batch shape); `compilations()` counts them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NEG = -1.0e9  # transformers' "impossible" score in beam search
_compilations = 0


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  max_new_tokens: int = 40
  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0                       # 0 = off
  top_p: float = 1.0                   # 1.0 = off
  repetition_penalty: float = 1.0      # 1.0 = off; > 1 discourages tokens already in the row
  penalize_prompt: bool = True         # the prompt's tokens count as already in the row (transformers,
                                       # decoder-only); False: only the new tokens (as an encoder-decoder)
  num_return_sequences: int = 1
  num_beams: int = 1
  length_penalty: float = 1.0          # beam search: score = sum log p / new_length ** length_penalty
  early_stopping: bool | str = False   # beam search: True | False | "never", as transformers
  eos_ids: tuple[int, ...] = ()        # a row ends after emitting one of these
  stop_ids: tuple[int, ...] = ()       # tokens that also end a row (e.g. every token containing "\n")
  pad_id: int = 0                      # emitted after a row ended

  def __post_init__(self):
    checks = [(self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
              (self.temperature > 0, "temperature must be > 0"),
              (self.top_k >= 0, "top_k must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
              (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
              (self.num_beams >= 1, "num_beams must be >= 1"),
              (1 <= self.num_return_sequences <= max(self.num_beams, 1) or self.num_beams == 1,
               "num_return_sequences must be <= num_beams with beam search"),
              (not (self.do_sample and self.num_beams > 1), "beam search here is deterministic: do_sample must be False"),
              (self.early_stopping in (True, False, "never"), "early_stopping must be True, False or 'never'")]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"DecodeConfig: {message} (got {self})")


def compilations() -> int:
  """How many times the decoding loop has been traced (= compiled) in this process."""
  return _compilations


def stop_token_ids(tokenizer, stop_strings: Sequence[str]) -> tuple[int, ...]:
  """Vocabulary ids whose text contains one of `stop_strings` (a row can stop on them inside jit;
  strings split over several tokens are still cut afterwards, at the text level)."""
  pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
  texts = [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]
  return tuple(i for i, t in enumerate(texts) if any(s in t for s in stop_strings))


# ---------------------------------------------------------------------------------------------
# Logits processors: [B, V] fp32 -> [B, V], each equal to its transformers counterpart.

def apply_repetition_penalty(logits, seen, penalty: float):
  """`RepetitionPenaltyLogitsProcessor`: logits of seen tokens: positive / penalty, negative * penalty."""
  if penalty == 1.0:
    return logits
  return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def apply_top_k(logits, k: int):
  """`TopKLogitsWarper`: -inf below the k-th largest logit (ties with it are kept)."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def apply_top_p(logits, p: float):
  """`TopPLogitsWarper`: keep the smallest set of most likely tokens whose probability reaches p
  (HF: ascending sort, drop tokens whose cumulative probability is <= 1 - p; the top token stays).

  Without sorting: token i is dropped iff the mass of the tokens no likelier than it, S(prob_i), is
  <= 1 - p, and S is monotone, so the dropped tokens are those with prob <= t*, the largest t with
  S(t) <= 1 - p. t* is found by bisection over the bit patterns of float32 in [0, 1] (ordered like the
  numbers), 31 masked sums over the vocabulary: exact on the float grid. XLA:CPU's sort of a 49k
  vocabulary cost ~40x more than the decode step's matmuls. Tokens tied at the boundary are kept or
  dropped together (HF's sort drops some of them by position).
  """
  if p >= 1.0:
    return logits
  budget = 1.0 - p
  one = jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32)

  def cutoff(row_logits):  # one row: its probabilities stay in cache through the 31 passes
    probs = jax.nn.softmax(row_logits.astype(jnp.float32))

    def halve(_, bounds):  # invariant: S(lo) <= 1 - p (S(0) = 0), S(hi) > 1 - p (S(1) = 1)
      lo, hi = bounds
      mid = lo + (hi - lo) // 2
      ok = jnp.sum(jnp.where(probs <= jax.lax.bitcast_convert_type(mid, jnp.float32), probs, 0.0)) <= budget
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), one))
    return jnp.where(probs <= jax.lax.bitcast_convert_type(lo, jnp.float32), -jnp.inf, row_logits)

  flat = logits.reshape(-1, logits.shape[-1])
  return jax.lax.map(cutoff, flat, batch_size=8).reshape(logits.shape)  # rows in cache-sized groups


def sample(key, scores, block: int = 256):
  """One token per row from softmax(scores) (-inf: never), by inverting the CDF with one uniform per
  row. The same distribution as `jax.random.categorical`, whose Gumbel noise for every vocabulary entry
  cost more than the decode step's forward on CPU."""
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  return _draw(_uniforms(key, probs.shape[0], 1), probs, block)[:, 0]


def sample_top_p(key, scores, p: float, *, candidates: int | None = None, group: int = 4, block: int = 256):
  """One token per row from the top-p nucleus of softmax(scores): the distribution of `sample(key,
  apply_top_p(scores, p))`, by rejection instead of finding the cut.

  Token i is in the nucleus iff S(prob_i) > 1 - p, where S(t) is the mass of the tokens no likelier than
  t (`apply_top_p`'s rule). So: draw `candidates` tokens per row from the whole softmax, keep the first
  whose S (one masked sum each) clears 1 - p. The nucleus holds at least p of the mass, so all are
  rejected with probability at most (1 - p) ** candidates; those rows (rare: a row-step in ~10^4 at the
  default count) take the exact cut, which keeps the distribution exact. Rows go through in cache-sized
  groups. XLA:CPU, batch 64 x 49,152: 4 ms a call instead of the cut's 18 ms (31 masked sums).
  """
  candidates = candidates or _candidates(p)
  if p >= 1.0 or candidates > 16:  # a narrow nucleus would be rejected too often: cut it
    return sample(key, apply_top_p(scores, p), block)
  draw_key, fallback_key = _split(key)
  u = _uniforms(draw_key, scores.shape[0], candidates)

  def first_kept(row):  # one row: (token, whether a candidate was kept)
    u_row, scores_row = row
    probs = jax.nn.softmax(scores_row.astype(jnp.float32))
    drawn = _draw(u_row[None], probs[None], block)[0]                               # [candidates]
    mass_below = jnp.sum(jnp.where(probs[None] <= probs[drawn][:, None], probs[None], 0.0), axis=-1)
    kept = mass_below > 1.0 - p
    return drawn[jnp.argmax(kept)], kept.any()

  token, found = jax.lax.map(first_kept, (u, scores), batch_size=group)
  return jax.lax.cond(found.all(), lambda: token,
                      lambda: jnp.where(found, token, sample(fallback_key, apply_top_p(scores, p), block)))


def _uniforms(key, rows: int, n: int):
  """Uniforms [rows, n] in [0, 1): from one key for the batch, or each row from its own (keys [rows])."""
  if key.ndim == 0:
    return jax.random.uniform(key, (rows, n))
  return jax.vmap(lambda k: jax.random.uniform(k, (n,)))(key)


def _split(key):
  """Two keys from one key, or two [rows] key arrays from per-row keys."""
  if key.ndim == 0:
    return tuple(jax.random.split(key))
  pairs = jax.vmap(jax.random.split)(key)  # [rows, 2]
  return pairs[:, 0], pairs[:, 1]


def _candidates(p: float) -> int:
  """Draws per row so that all fall outside the nucleus (mass >= p) with probability <= 1e-4."""
  return max(1, math.ceil(math.log(1e-4) / math.log(1.0 - p))) if p < 1.0 else 1


def _draw(u, probs, block: int):
  """Tokens [B, n] for uniforms u [B, n] in [0, 1) under probs [B, V], by inverting the CDF in two levels
  (block masses, then the chosen block's tokens) to keep the cumulative sums short."""
  b, v = probs.shape
  nblocks = -(-v // block)
  probs = jnp.pad(probs, ((0, 0), (0, nblocks * block - v))).reshape(b, nblocks, block)
  mass = probs.sum(-1)                                                            # [B, blocks]
  cdf = jnp.cumsum(mass, axis=-1)
  u = u[..., None] * cdf[:, None, -1:]                                            # [B, n, 1]
  chosen = _first_above(cdf[:, None], u, (mass > 0)[:, None])                     # [B, n]: the block holding u
  inside = jnp.take_along_axis(probs, chosen[..., None], axis=1)                  # [B, n, block]
  before = jnp.pad(cdf[:, :-1], ((0, 0), (1, 0)))                                 # mass of the earlier blocks
  start = jnp.take_along_axis(before, chosen, axis=1)[..., None]
  token = _first_above(start + jnp.cumsum(inside, axis=-1), u, inside > 0)
  return chosen * block + token


def _first_above(cdf, u, positive):
  """Per row, the first index of positive probability whose cumulative value exceeds u (if rounding
  leaves none, the last index of positive probability): never a token of probability zero."""
  hit = (cdf > u) & positive
  last = cdf.shape[-1] - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
  return jnp.where(hit.any(axis=-1), jnp.argmax(hit, axis=-1), last)


def process(logits, seen, config: DecodeConfig, *, top_p: bool = True):
  """The processor chain in transformers' order; `top_p=False` leaves the nucleus to `sample_top_p`."""
  logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
  if config.do_sample:
    logits = logits / config.temperature if config.temperature != 1.0 else logits
    logits = apply_top_k(logits, config.top_k)
    logits = apply_top_p(logits, config.top_p) if top_p else logits
  return logits


def seen_tokens(ids, mask, vocab_size: int):
  """[B, V] bool: which tokens occur in each row (padding excluded)."""
  rows = jnp.arange(ids.shape[0])[:, None]
  return jnp.zeros((ids.shape[0], vocab_size), bool).at[rows, ids].max(mask.astype(bool))


# ---------------------------------------------------------------------------------------------
# The model behind one interface: start (prefill) -> (logits [B, V], state); step(state, token, active).

def _rows(tree, index, axis_of):
  """Rows `index` of every array in a decoding state; `axis_of(tree)` gives each leaf's batch axis (-1: none)."""
  return jax.tree.map(lambda a, ax: a if ax < 0 else jnp.take(a, index, axis=ax), tree, axis_of(tree))


class _DecoderOnly:
  def __init__(self, model):
    self.model = model

  def start(self, ids, mask, prefix, prefix_mask, new_tokens):
    b, t = ids.shape
    p = 0 if prefix is None else prefix.shape[1]
    cache = self.model.init_cache(b, p + t + new_tokens)
    # The last position's logits only: all T of them ([B, T, V] fp32, 2.8 GB at 64 x 224) cost a fifth of
    # the prefill's time, for columns nothing reads.
    logits, cache = self.model(ids, attention_mask=mask, embedded_prefix=prefix, prefix_mask=prefix_mask, cache=cache,
                               columns=slice(t - 1, t))
    return logits[:, -1], cache

  def step(self, cache, token, active):
    logits, cache = self.model(token[:, None], attention_mask=active[:, None], cache=cache)  # ended rows: masked
    return logits[:, -1], cache

  @staticmethod
  def batch_axes(cache):
    return cache.replace(k=1, v=1, valid=0, length=0, index=-1)


class _EncoderDecoder:
  def __init__(self, model):
    self.model = model

  def start(self, ids, mask, prefix, prefix_mask, new_tokens):
    encoded, encoded_mask = self.model.encode(ids, mask, embedded_prefix=prefix, prefix_mask=prefix_mask)
    state = (self.model.init_cache(ids.shape[0], new_tokens + 1), encoded, encoded_mask, self.model.cross_kv(encoded))
    start = jnp.full((ids.shape[0],), self.model.cfg.decoder_start_token_id, jnp.int32)
    return self.step(state, start, jnp.ones(ids.shape[0], bool))

  def step(self, state, token, active):
    cache, encoded, encoded_mask, cross = state
    logits, cache = self.model.decode(token[:, None], encoded, encoded_mask, decoder_attention_mask=active[:, None],
                                      cache=cache, cross_kv=cross)
    return logits[:, -1], (cache, encoded, encoded_mask, cross)

  @staticmethod
  def batch_axes(state):
    cache, _, _, (xk, _) = state
    return (_DecoderOnly.batch_axes(cache), 0, 0, (1, 1))


def _interface(model):
  return _EncoderDecoder(model) if hasattr(model, "encode") else _DecoderOnly(model)


# ---------------------------------------------------------------------------------------------

def generate(model, input_ids, attention_mask, config: DecodeConfig, *, rng=None, embedded_prefix=None,
             prefix_mask=None, shrink_every: int = 0):
  """New tokens [B * n, max_new_tokens] (n = num_return_sequences; copies of a row are adjacent);
  after a row ends (EOS or stop token, which is kept) it holds `pad_id`.

  `rng`: one key, or one key per row ([B]). Each row draws its tokens from its own stream (a row's key,
  or `fold_in(rng, row)`), so with per-row keys a row's text does not depend on which other rows share
  its batch: a generation cut into other batches, or resumed, draws the same tokens.

  `shrink_every` > 0 (sampling or greedy, one sequence a row): every that many steps, once the rows
  still running fit in half the batch or less, they go on in a batch of that size (halving, at least
  `SHRINK_MIN_ROWS`) without the ended ones. A batch otherwise computes every row until its longest
  ends: label strings and CrossNER sentences end at very different steps. Each row's tokens are the
  same either way (its own cache, key and step count); each batch size is one more compilation."""
  if config.do_sample and rng is None:
    raise ValueError("generate: do_sample=True needs rng= (a jax.random key)")
  rng = jax.random.key(0) if rng is None else rng
  if rng.ndim and rng.shape != (len(input_ids),):
    raise ValueError(f"generate: rng= holds {rng.shape[0]} keys for {len(input_ids)} rows; give one key, or one per row")
  args = (model, jnp.asarray(input_ids), jnp.asarray(attention_mask, bool), rng, embedded_prefix, prefix_mask)
  if shrink_every > 0 and config.num_beams == 1 and config.num_return_sequences == 1:
    return _generate_shrinking(*args, config=config, every=shrink_every)
  return _generate(*args, config=config)


def greedy(model, input_ids, attention_mask, *, max_new_tokens: int, eos_id: int = -1, pad_id: int = 0,
           embedded_prefix=None, prefix_mask=None):
  """Greedy continuation: `generate` with the default (argmax) config."""
  config = DecodeConfig(max_new_tokens=max_new_tokens, eos_ids=(int(eos_id),) if eos_id >= 0 else (),
                        pad_id=int(pad_id))
  return generate(model, input_ids, attention_mask, config, embedded_prefix=embedded_prefix, prefix_mask=prefix_mask)


@functools.partial(nnx.jit, static_argnames=("config",))
def _generate(model, input_ids, attention_mask, rng, embedded_prefix, prefix_mask, *, config: DecodeConfig):
  global _compilations
  _compilations += 1  # runs once per trace
  lm, logits, seen, state, keys = _begin(model, input_ids, attention_mask, rng, embedded_prefix, prefix_mask, config)
  loop = _beam_search if config.num_beams > 1 else _sample
  return loop(lm, logits, seen, state, keys, config)


SHRINK_MIN_ROWS = 4  # smaller batches save little more on a CPU: a step's weights are read whatever the rows


def _generate_shrinking(model, input_ids, attention_mask, rng, embedded_prefix, prefix_mask, *, config: DecodeConfig,
                        every: int):
  """`_sample` in stretches of `every` steps, moving the running rows into a smaller batch between them."""
  carry, keys = _start_sampling(model, input_ids, attention_mask, rng, embedded_prefix, prefix_mask, config=config)
  n, axes = config.max_new_tokens, _interface(model).batch_axes
  tokens = np.full((input_ids.shape[0], n), config.pad_id, np.int32)
  rows = np.arange(input_ids.shape[0])  # the input row of each batch row; -1: a filler
  step = 0
  while True:
    step = min(step + every, n)
    carry = _continue_sampling(model, carry, keys, jnp.int32(step), config=config)
    running = np.flatnonzero(~np.asarray(carry[4]))
    if step >= n or not len(running):
      break
    size = len(rows)
    while size % 2 == 0 and size // 2 >= max(len(running), SHRINK_MIN_ROWS):
      size //= 2
    if size == len(rows):
      continue
    out, real = np.asarray(carry[5]), rows >= 0
    tokens[rows[real]] = out[real]  # the ended rows' tokens are final; the running ones are rewritten later
    index = np.concatenate([running, np.full(size - len(running), running[0])])  # fillers: a running row's copy
    i, logits, seen, state, _, out = carry
    pick = lambda a: None if a is None else a[jnp.asarray(index)]
    carry = (i, pick(logits), pick(seen), _rows(state, jnp.asarray(index), axes), jnp.asarray(np.arange(size) >= len(running)),
             pick(out))  # fillers start done: they never hold the loop
    keys, rows = pick(keys), np.concatenate([rows[running], np.full(size - len(running), -1)])
  out, real = np.asarray(carry[5]), rows >= 0
  tokens[rows[real]] = out[real]
  return jnp.asarray(tokens)


@functools.partial(nnx.jit, static_argnames=("config",))
def _start_sampling(model, input_ids, attention_mask, rng, embedded_prefix, prefix_mask, *, config: DecodeConfig):
  global _compilations
  _compilations += 1
  _, logits, seen, state, keys = _begin(model, input_ids, attention_mask, rng, embedded_prefix, prefix_mask, config)
  return _sample_carry(logits, seen, state, config), keys


@functools.partial(nnx.jit, static_argnames=("config",))
def _continue_sampling(model, carry, keys, until, *, config: DecodeConfig):
  global _compilations
  _compilations += 1
  return _sample_loop(_interface(model), carry, keys, config, until)


def _begin(model, input_ids, attention_mask, rng, embedded_prefix, prefix_mask, config: DecodeConfig):
  """Prefill, the repetition-penalty state, row copies and each row's key: (lm, logits, seen, state, keys)."""
  lm = _interface(model)
  logits, state = lm.start(input_ids, attention_mask, embedded_prefix, prefix_mask, config.max_new_tokens)
  if config.repetition_penalty == 1.0:  # nothing reads it: skip a [B, V] update per step
    seen = None
  elif not config.penalize_prompt:  # only what this call writes
    seen = jnp.zeros((input_ids.shape[0], logits.shape[-1]), bool)
  elif isinstance(lm, _EncoderDecoder):  # transformers counts the decoder's own ids: the start token
    seen = seen_tokens(jnp.full((input_ids.shape[0], 1), model.cfg.decoder_start_token_id), jnp.ones((input_ids.shape[0], 1)),
                       logits.shape[-1])
  else:
    seen = seen_tokens(input_ids, attention_mask, logits.shape[-1])
  copies = config.num_beams if config.num_beams > 1 else config.num_return_sequences
  if copies > 1:  # prefill once per prompt, then copy the rows
    index = jnp.repeat(jnp.arange(input_ids.shape[0]), copies)
    logits, state = logits[index], _rows(state, index, lm.batch_axes)
    seen = None if seen is None else seen[index]
  keys = rng if rng.ndim else jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(input_ids.shape[0]))
  if copies > 1:  # each copy of a row its own stream
    keys = jax.vmap(jax.random.fold_in)(keys[index], jnp.tile(jnp.arange(copies), input_ids.shape[0]))
  return lm, logits, seen, state, keys


def _ends(token, config: DecodeConfig):
  ends = jnp.zeros(token.shape, bool)
  for i in config.eos_ids + config.stop_ids:
    ends |= token == i
  return ends


def _sample(lm, logits, seen, state, keys, config: DecodeConfig):
  """Sampling or greedy decoding; `keys` [B]: each row's own stream, folded with the step."""
  return _sample_loop(lm, _sample_carry(logits, seen, state, config), keys, config)[-1]


def _sample_carry(logits, seen, state, config: DecodeConfig):
  """The loop's state before step 0: (step, logits, seen, model state, done [B], tokens [B, N])."""
  b = logits.shape[0]
  return (jnp.zeros((), jnp.int32), logits, seen, state, jnp.zeros((b,), bool),
          jnp.full((b, config.max_new_tokens), config.pad_id, jnp.int32))


def _sample_loop(lm, carry, keys, config: DecodeConfig, until=None):
  """Steps until every row ended, `max_new_tokens`, or step `until`."""
  n = config.max_new_tokens if until is None else jnp.minimum(until, config.max_new_tokens)
  rows = jnp.arange(carry[1].shape[0])

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < n) & ~done.all()

  def body(carry):
    i, logits, seen, state, done, out = carry
    scores = process(logits, seen, config, top_p=False)
    if config.do_sample:
      token = sample_top_p(jax.vmap(jax.random.fold_in, (0, None))(keys, i), scores, config.top_p)
    else:
      token = jnp.argmax(scores, axis=-1)
    token = jnp.where(done, config.pad_id, token.astype(jnp.int32))
    out = out.at[:, i].set(token)
    seen = None if seen is None else seen.at[rows, token].max(~done)
    done = done | _ends(token, config)
    logits, state = lm.step(state, token, ~done)
    return i + 1, logits, seen, state, done, out

  return jax.lax.while_loop(cond, body, carry)


def _beam_search(lm, logits, seen, state, keys, config: DecodeConfig):
  """transformers' `_beam_search` (v5), vectorised the same way, inside one while_loop."""
  del keys
  k, n, vocab = config.num_beams, config.max_new_tokens, logits.shape[-1]
  b = logits.shape[0] // k
  # Candidates per row: enough to leave k running even if every ender (EOS or stop token, transformers'
  # `eos_token_id` list) is among each beam's best continuations.
  enders = len(set(config.eos_ids + config.stop_ids))
  keep = min(max(2, 1 + enders) * k, k * vocab)
  top_k_mask = jnp.arange(keep) < k
  lp, early = config.length_penalty, config.early_stopping
  gather = lambda a, idx: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

  def cond(c):
    return (c["i"] < n) & c["go"]

  def body(c):
    i = c["i"]
    log_probs = process(jax.nn.log_softmax(c["logits"], axis=-1), c["seen"], config)
    total = (log_probs.reshape(b, k, vocab) + c["running_scores"][:, :, None]).reshape(b, k * vocab)
    top_scores, top_index = jax.lax.top_k(total, keep)                      # [b, keep]
    parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    top_seqs = gather(c["running"], parent).at[:, :, i].set(token)          # [b, keep, n]
    hits = _ends(token, config) | (i + 1 >= n)                              # max length ends every beam

    # The k best candidates that did not end keep running.
    running_scores_all = top_scores + hits * NEG
    chosen = jax.lax.top_k(running_scores_all, k)[1]
    running = gather(top_seqs, chosen)
    running_scores = gather(running_scores_all, chosen)
    source = (gather(parent, chosen) + jnp.arange(b)[:, None] * k).reshape(-1)  # flat parent rows

    # Candidates among the top k that ended join the finished bank if they beat its worst.
    finished_now = hits & top_k_mask[None, :]
    scores = top_scores / (i + 1.0) ** lp
    scores += (c["finished"].all(-1, keepdims=True) & (early is True)) * NEG
    scores += (~c["improvable"]) * NEG
    scores += (~finished_now) * NEG
    merged = jax.lax.top_k(jnp.concatenate([c["scores"], scores], 1), k)[1]
    bank = gather(jnp.concatenate([c["bank"], top_seqs], 1), merged)
    bank_scores = gather(jnp.concatenate([c["scores"], scores], 1), merged)
    finished = gather(jnp.concatenate([c["finished"], finished_now], 1), merged)

    # Could a running beam still beat the worst finished one? (transformers' heuristic)
    best_length = (n if (early == "never" and lp > 0.0) else i + 1.0)
    best_running = running_scores[:, :1] / best_length ** lp
    worst_finished = jnp.where(finished, bank_scores.min(1, keepdims=True), NEG)
    improvable = c["improvable"] & (best_running > worst_finished).any(-1, keepdims=True)
    go = improvable.any() & ~(finished.all() & (early is True)) & ~hits.all()

    seen = None if c["seen"] is None else c["seen"][source].at[jnp.arange(b * k), running[:, :, i].reshape(-1)].set(True)
    state = _rows(c["state"], source, lm.batch_axes)
    logits, state = lm.step(state, running[:, :, i].reshape(-1), jnp.ones(b * k, bool))
    return dict(i=i + 1, logits=logits, seen=seen, state=state, running=running, running_scores=running_scores,
                bank=bank, scores=bank_scores, finished=finished, improvable=improvable, go=go)

  fill = jnp.full((b, k, n), config.pad_id, jnp.int32)
  carry = dict(i=jnp.zeros((), jnp.int32), logits=logits, seen=seen, state=state, running=fill,
               running_scores=jnp.zeros((b, k)).at[:, 1:].set(NEG), bank=fill, scores=jnp.full((b, k), NEG),
               finished=jnp.zeros((b, k), bool), improvable=jnp.ones((b, 1), bool), go=jnp.ones((), bool))
  out = jax.lax.while_loop(cond, body, carry)
  return out["bank"][:, :config.num_return_sequences].reshape(b * config.num_return_sequences, n)
