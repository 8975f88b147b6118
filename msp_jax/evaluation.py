"""Text metrics. BLEU follows sacrebleu's corpus BLEU (4-grams, brevity penalty, 'exp' smoothing)
on whitespace tokens, so numbers compare with `sacrebleu.corpus_bleu(..., tokenize="none")`."""
from __future__ import annotations

import collections
import math
from typing import Sequence


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
