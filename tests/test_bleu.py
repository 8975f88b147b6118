"""Metrics against independent references (sacrebleu) and hand-computed values."""
import math

import pytest
import sacrebleu

from msp_jax.metrics import text_quality

CORPORA = [
    (["the cat sat on the mat", "a quick brown fox"], [["the cat is on the mat"], ["the quick brown fox jumps"]]),
    (["book a room for two nights please"], [["please book a room for two nights"]]),
    (["hello"], [["hello there my friend"]]),  # brevity penalty and empty higher orders
    (["i want to cancel my booking", "is there wifi in the room", "no"],
     [["i need to cancel my booking"], ["do you have wifi in the room"], ["no thanks"]]),
    (["the the the the"], [["the cat", "the the cat"]]),  # clipping against the best of two references
]


@pytest.mark.parametrize("hyps,refs", CORPORA)
def test_corpus_bleu_equals_sacrebleu(hyps, refs):
  n_refs = max(len(r) for r in refs)
  streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(n_refs)]
  want = sacrebleu.corpus_bleu(hyps, streams, tokenize="none").score
  assert text_quality.corpus_bleu(hyps, refs) == pytest.approx(want, abs=1e-6)


def test_bleu_by_hand():
  assert text_quality.corpus_bleu(["a b c d"], [["a b c d"]]) == pytest.approx(100.0)
  # 3 of 4 unigrams, 2/3 bigrams, 1/2 trigrams, 0/1 4-grams (smoothed to 1/2), same length
  want = 100 * math.exp((math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4)
  assert text_quality.corpus_bleu(["a b c x"], [["a b c d"]]) == pytest.approx(want)
