"""Metrics, by what they measure:

  text_quality  the generated text itself: BLEU, distinct-n, self-BLEU, seed overlap, label presence,
                perplexity (no labels or downstream model involved)
  task_scores   the downstream models' predictions against gold labels: intent / slot / entity F1,
                intent-set accuracy, attribute correctness, each beside the original MSP code's variant
"""
