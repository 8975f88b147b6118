"""Text metrics. BLEU follows sacrebleu's corpus BLEU (4-grams, brevity penalty, 'exp' smoothing)
on whitespace tokens, so numbers compare with `sacrebleu.corpus_bleu(..., tokenize="none")`.

Data-quality metrics of generated text (diversity, overlap with the seeds, label presence, fluency)
follow their standard definitions; where the original MSP code differs, the docstring says how."""
from __future__ import annotations

import collections
import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from msp_jax.data.spans import whole_word
from msp_jax.data.splits import seeded_sample


def ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4) -> float:
  """BLEU (0-100) of hypotheses against one or more references each."""
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
  correct, total = [0] * max_order, [0] * max_order
  hyp_len = ref_len = 0
  for hyp, refs in zip(hypotheses, references):
    hyp_tokens, ref_tokens = hyp.split(), [r.split() for r in refs]
    hyp_len += len(hyp_tokens)
    ref_len += min((abs(len(r) - len(hyp_tokens)), len(r)) for r in ref_tokens)[1]  # closest length
    for n in range(1, max_order + 1):
      counts = ngrams(hyp_tokens, n)
      best = collections.Counter()
      for r in ref_tokens:
        best |= ngrams(r, n)
      correct[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
      total[n - 1] += max(len(hyp_tokens) - n + 1, 0)
  return _bleu_from_stats(correct, total, hyp_len, ref_len, max_order)


def _bleu_from_stats(correct: Sequence[int], total: Sequence[int], hyp_len: int, ref_len: int,
                     max_order: int) -> float:
  if hyp_len == 0:
    return 0.0
  log_precision, smooth = 0.0, 1.0
  for c, t in zip(correct, total):
    if t == 0:
      return 0.0
    if c == 0:
      smooth *= 2
      log_precision += math.log(1.0 / (smooth * t))
    else:
      log_precision += math.log(c / t)
  brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
  return 100.0 * brevity * math.exp(log_precision / max_order)


def _lower_tokens(text: str) -> list[str]:
  return text.lower().split()


def distinct_n(texts: Iterable[str], n: int) -> float:
  """Distinct-n: unique / total n-grams over the whole corpus (lowercased whitespace tokens).

  The original split on single spaces without lowercasing; 0.0 when the corpus has no n-gram."""
  counts = collections.Counter()
  for text in texts:
    counts.update(ngrams(_lower_tokens(text), n))
  total = sum(counts.values())
  return len(counts) / total if total else 0.0


def self_bleu(texts: Sequence[str], max_order: int = 4, max_texts: int | None = None, seed: int = 0) -> float:
  """Self-BLEU (0-100): mean over texts i of `corpus_bleu([texts[i]], [all other texts])`.

  Higher means less diverse. Equal to that definition (case-sensitive, as corpus_bleu) but linear in
  corpus size: per n-gram only the two largest counts over the corpus are kept, so the clip count
  against "all texts but i" is the larger one from another text. `max_texts` averages over a
  deterministic random subset of hypotheses (from `seed`); references are always all other texts.
  Fewer than two texts have no references: nan.
  """
  if max_texts is not None and max_texts < 1:
    raise ValueError(f"max_texts must be positive, got {max_texts}")
  if len(texts) < 2:
    return math.nan
  tokens = [t.split() for t in texts]
  best = []  # per order: n-gram -> [top count, index of a text with it, second count]
  for n in range(1, max_order + 1):
    table: dict[tuple, list] = {}
    for j, toks in enumerate(tokens):
      for g, c in ngrams(toks, n).items():
        entry = table.setdefault(g, [0, -1, 0])
        if c > entry[0]:
          entry[1:] = [j, entry[0]]
          entry[0] = c
        elif c > entry[2]:
          entry[2] = c
    best.append(table)
  lengths = collections.Counter(len(t) for t in tokens)
  chosen = range(len(texts))
  if max_texts is not None:
    chosen = seeded_sample(chosen, max_texts, seed)
  scores = []
  for i in chosen:
    hyp = tokens[i]
    others = [L for L, c in lengths.items() if c - (L == len(hyp)) > 0]
    ref_len = min((abs(L - len(hyp)), L) for L in others)[1]
    correct, total = [], []
    for n, table in enumerate(best, start=1):
      clipped = 0
      for g, c in ngrams(hyp, n).items():
        top, holder, second = table[g]
        clipped += min(c, second if holder == i else top)
      correct.append(clipped)
      total.append(max(len(hyp) - n + 1, 0))
    scores.append(_bleu_from_stats(correct, total, len(hyp), ref_len, max_order))
  return float(np.mean(scores))


def sampled_diversity(texts: Sequence[str], sample_size: int, draws: int = 5, seed: int = 0) -> dict:
  """distinct_1/2/3 and self_bleu as means over `draws` random samples of `sample_size` texts.

  Both depend on how much text there is: a larger corpus repeats more n-grams (lower distinct-n) and
  gives each text more references (higher self-BLEU). So sets of different sizes compare only on
  samples of one size. Samples are drawn without replacement from `seed`; a set of exactly
  `sample_size` texts is its own (only) sample, and a smaller one gives nan: undefined at that size.
  """
  if sample_size < 2 or draws < 1:
    raise ValueError(f"sample_size must be >= 2 and draws >= 1, got {sample_size} and {draws}")
  keys = ("distinct_1", "distinct_2", "distinct_3", "self_bleu")
  if len(texts) < sample_size:
    return dict.fromkeys(keys, math.nan)
  rng = np.random.default_rng(seed)
  samples = [list(texts)] if len(texts) == sample_size else \
      [[texts[i] for i in rng.choice(len(texts), sample_size, replace=False)] for _ in range(draws)]
  per_sample = [[distinct_n(s, 1), distinct_n(s, 2), distinct_n(s, 3), self_bleu(s)] for s in samples]
  return dict(zip(keys, np.mean(per_sample, axis=0).tolist()))


def ngram_overlap(generated: Iterable[str], seeds: Iterable[str], n: int) -> float:
  """Fraction of the generated n-gram occurrences (lowercased tokens) that occur anywhere in the seeds.

  High values mean the generator copies its seed data. The original's "overlap@2" instead took, per
  output, the best overlap of its *set* of bigrams with a single other text; 0.0 with no n-grams."""
  seen = set()
  for text in seeds:
    seen.update(ngrams(_lower_tokens(text), n))
  hits = total = 0
  for text in generated:
    for g, c in ngrams(_lower_tokens(text), n).items():
      total += c
      hits += c if g in seen else 0
  return hits / total if total else 0.0


def contains_word(text: str, value: str) -> bool:
  """Whether value occurs in text as whole words, case-insensitively ("art" is not in "party")."""
  return whole_word(value).search(text) is not None


def label_presence(records: Iterable[Mapping]) -> tuple[float, list[bool | None]]:
  """(rate, per-record flags) for generator records: does the text contain all its requested values?

  The rate is over records with values only (nan if there are none); a record without values is
  flagged None. Catches generated text that drops the slot values or entities it was asked for."""
  flags: list[bool | None] = []
  for r in records:
    values = list(r.get("values") or ())
    flags.append(all(contains_word(r["text"], v) for v in values) if values else None)
  judged = [f for f in flags if f is not None]
  return (sum(judged) / len(judged) if judged else math.nan), flags


def token_nll(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-sequence summed negative log-likelihood and token count.

  logits [B, T, V] score targets [B, T] at the same position (shift before calling); mask [B, T] is
  true for the tokens that count. Computed with a float64 log-softmax, so sums over many tokens stay
  exact enough; masked positions may hold any target id (e.g. -100)."""
  logits = np.asarray(logits, dtype=np.float64)
  mask = np.asarray(mask, dtype=bool)
  safe = np.where(mask, np.asarray(targets), 0)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  picked = np.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  return -(picked * mask).sum(axis=-1), mask.sum(axis=-1)


def perplexity_from_nll(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
  """Corpus perplexity exp(total NLL / total tokens): every token weighs the same.

  The original divided the model's loss, already a per-token mean, by the padded batch length again
  and then averaged per-batch perplexities, which understates perplexity and depends on batching.
  nan when there are no tokens."""
  nll, counts = np.asarray(nll_sums, dtype=np.float64), np.asarray(token_counts, dtype=np.float64)
  if nll.shape != counts.shape:
    raise ValueError(f"{nll.shape} NLL sums but {counts.shape} token counts")
  tokens = counts.sum()
  return float(math.exp(nll.sum() / tokens)) if tokens > 0 else math.nan
