"""Batches decoded back to text with the real SmolLM2 tokenizer and a tiny T5 one."""
import numpy as np
import pytest

from msp_jax.data.batching import BatchConfig, full_loss_mask, make_batch
from msp_jax.data.layout import Segments, prompt_text
from msp_jax.data.sources import DataError

TEXT = prompt_text(["hot", "today"], "weather", ["How warm is it", "Will it rain?"])
SHORT = prompt_text([], "music", ["In 2003 , the Stade de France was the primary site ."])
TARGET = "How hot is it going to get today?"
SEGMENTS = [
    Segments("weather/train/0", ((0, 2), (1,)), 1, TEXT, TARGET),
    Segments("music/train/4", ((5,), ()), 0, SHORT, "Stade de France"),
]
CONFIG = BatchConfig(buckets=(16, 32, 64, 128), max_mixture=3)


def length(tok, text):
  return len(tok(text, add_special_tokens=False)["input_ids"])


def test_decoder_only_layout_decodes_to_the_exact_prompt(smollm2_tokenizer):
  tok = smollm2_tokenizer
  batch = make_batch(SEGMENTS, tok, CONFIG)
  longest = max(length(tok, s.text) + length(tok, s.target) + 1 for s in SEGMENTS)
  t = min(b for b in CONFIG.buckets if b >= longest)
  assert batch["input_ids"].shape == (2, t) and batch["input_ids"].dtype == np.int32
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  for i, seg in enumerate(SEGMENTS):
    ids, mask, loss = batch["input_ids"][i], batch["attention_mask"][i], full_loss_mask(batch["loss_mask"], t)[i]
    n = length(tok, seg.text) + length(tok, seg.target) + 1
    assert list(mask) == [False] * (t - n) + [True] * n  # left padding
    assert (ids[~mask] == pad).all()
    assert tok.decode(ids[mask]) == seg.text + seg.target + "<|im_end|>"
    assert tok.decode(ids[mask & ~loss]) == seg.text
    # The documented convention: logits[:, t] predict ids[:, t + 1], scored where loss_mask[:, t + 1].
    assert tok.decode(ids[1:][loss[1:]]) == seg.target + "<|im_end|>"
    assert ids[loss][-1] == tok.eos_token_id == 2
  # the mask covers the suffix window that holds every target: the smallest bucket >= the longest target + EOS
  longest_target = max(length(tok, s.target) + 1 for s in SEGMENTS)
  assert batch["loss_mask"].shape == (2, min(min(b for b in CONFIG.buckets if b >= longest_target), t))


def test_attribute_and_domain_arrays(smollm2_tokenizer):
  batch = make_batch(SEGMENTS, smollm2_tokenizer, CONFIG)
  assert batch["attribute_ids"].shape == (2, 2, 2)  # M: the largest set (2) fits 2 slots of max_mixture 3
  np.testing.assert_array_equal(batch["attribute_ids"][0], [[0, 2], [1, 0]])
  np.testing.assert_array_equal(batch["attribute_mask"][0], [[True, True], [True, False]])
  np.testing.assert_array_equal(batch["attribute_mask"][1], [[True, False], [False, False]])
  np.testing.assert_array_equal(batch["domain_id"], [1, 0])
  np.testing.assert_array_equal(batch["example_mask"], [True, True])


@pytest.mark.parametrize("sizes,m", [((0,), 1), ((1, 0), 1), ((2,), 2), ((3, 1), 4), ((5,), 8), ((9,), 10), ((10,), 10)])
def test_the_attribute_axis_is_bucketed_to_a_power_of_two_up_to_max_mixture(smollm2_tokenizer, sizes, m):
  segments = [Segments(f"weather/train/{i}", (tuple(range(1, n + 1)),), 0, TEXT, TARGET) for i, n in enumerate(sizes)]
  batch = make_batch(segments, smollm2_tokenizer, BatchConfig(buckets=(64,), max_mixture=10))
  assert batch["attribute_ids"].shape == (len(sizes), 1, m)
  np.testing.assert_array_equal(batch["attribute_mask"].sum(-1)[:, 0], sizes)


def test_too_many_attributes_names_the_example_unless_truncating(smollm2_tokenizer):
  crowded = [Segments("reminder/train/9", ((1, 2, 3, 4),), 0, TEXT, TARGET)]
  with pytest.raises(DataError, match=r"example reminder/train/9: 4 attributes .* exceed max_mixture=3"):
    make_batch(crowded, smollm2_tokenizer, CONFIG)
  batch = make_batch(crowded, smollm2_tokenizer, BatchConfig(buckets=(64,), max_mixture=3, truncate_attributes=True))
  np.testing.assert_array_equal(batch["attribute_ids"][0, 0], [1, 2, 3])


def test_too_long_rows_fail_or_lose_prompt_text_from_the_left(smollm2_tokenizer):
  tok = smollm2_tokenizer
  with pytest.raises(DataError, match=r"example weather/train/0: \d+ tokens exceed the largest bucket 16"):
    make_batch(SEGMENTS[:1], tok, BatchConfig(buckets=(16,)))
  batch = make_batch(SEGMENTS[:1], tok, BatchConfig(buckets=(16,), truncate_text=True))
  ids, loss = batch["input_ids"][0], full_loss_mask(batch["loss_mask"], 16)[0]
  assert batch["attention_mask"].all() and ids.shape == (16,)
  assert tok.decode(ids[loss]) == TARGET + "<|im_end|>"
  assert TEXT.endswith(tok.decode(ids[~loss]))


def test_generation_batch_has_no_target(smollm2_tokenizer):
  tok = smollm2_tokenizer
  segments = [Segments(s.uid, s.attribute_ids, s.domain_id, s.text, None) for s in SEGMENTS]
  batch = make_batch(segments, tok, CONFIG)
  assert not batch["loss_mask"].any()
  for i, seg in enumerate(segments):
    mask = batch["attention_mask"][i]
    assert mask[-1] and tok.decode(batch["input_ids"][i][mask]) == seg.text  # ends at the right edge: "3) "


def test_t5_layout(tiny_t5_tokenizer):
  tok = tiny_t5_tokenizer
  # Texts with values: sentencepiece-style decoding drops a leading space, which is no batching matter.
  segments = [Segments("music/train/0", ((1,),), 0, TEXT, SEGMENTS[1].target),
              Segments("music/train/1", ((),), 0, "Stade de France in the music domain:\n1) ", "In 2003 , the Stade de France was the primary site .")]
  batch = make_batch(segments, tok, BatchConfig(buckets=(16, 32, 64), encoder_decoder=True))
  assert set(batch) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels",
                        "loss_mask", "attribute_ids", "attribute_mask", "domain_id", "example_mask"}
  assert (batch["decoder_attention_mask"] == batch["loss_mask"]).all()  # start + targets align with targets + EOS
  for i, seg in enumerate(segments):
    enc, enc_mask = batch["input_ids"][i], batch["attention_mask"][i]
    n = int(enc_mask.sum())
    assert enc_mask[:n].all() and not enc_mask[n:].any()  # right padded
    assert enc[n - 1] == tok.eos_token_id == 1 and tok.decode(enc[:n - 1]) == seg.text
    labels, dec, loss = batch["labels"][i], batch["decoder_input_ids"][i], batch["loss_mask"][i]
    m = int(loss.sum())
    assert tok.decode(labels[:m - 1]) == seg.target and labels[m - 1] == tok.eos_token_id
    assert dec[0] == tok.pad_token_id == 0 and list(dec[1:m]) == list(labels[:m - 1])
  generation = make_batch([Segments("g", ((),), 0, TEXT, None)], tok,
                          BatchConfig(buckets=(32, 64), encoder_decoder=True))
  assert "labels" not in generation and "decoder_input_ids" not in generation
