"""The original's downstream protocol (label_generator.py): label strings written and parsed back as
the original post-processed them, the loss on the target tokens alone, learning a toy, and an epoch
chosen on dev only."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msp_jax import label_generator as lg
from msp_jax.models import llama, weights


# --- label strings ----------------------------------------------------------------------------------

def test_intent_strings_round_trip_and_normalise_as_the_original():
  strings = lg.IntentStrings(["booking", "refund", "when", "check_in", "wifi", "dont_know",
                              "one_two_three_four_five_six_seven_eight"])
  assert strings.format({"when", "booking", "refund"}) == "booking;refund;when"
  assert strings.parse("booking;refund;when") == ({"booking", "refund", "when"}, 0)
  assert strings.parse("") == (set(), 0)
  # lowercase; punctuation and "_" become spaces; articles go; 7 tokens; cut at the end token past index 0
  assert strings.parse("Check-In; the WiFi ;don't know;Spa_Treatment<|endoftext|>refund") == ({"check_in", "wifi"}, 2)
  assert strings.parse("dont-know;an wifi!") == ({"dont_know", "wifi"}, 0)
  assert strings.parse("one two three four five six seven nine") == ({"one_two_three_four_five_six_seven_eight"}, 0)
  assert strings.parse("booking\nrefund") == (set(), 1)  # "booking | refund" is one unknown piece


def test_entity_strings_round_trip_parse_and_locate():
  strings = lg.EntityStrings(["location", "event", "musicalartist", "album", "song"])
  entities = [("location", "Stade de France"), ("event", "2003 World Championships")]
  text = strings.format(entities)
  assert text == "Stade de France [location] <sep> 2003 World Championships [event]"
  assert strings.parse(text) == (entities, 0)
  assert strings.parse("") == ([], 0)
  written = "The Beatles [MusicalArtist] <sep> Abbey Road [ Album ] <sep> Paul [hero] <sep> no brackets</s>x"
  assert strings.parse(written) == ([("musicalartist", "The Beatles"), ("album", "Abbey Road")], 2)
  sentence = "I love the beatles and Abbey Road , Abbey Road"
  found = lg.locate(sentence, [("musicalartist", "The Beatles"), ("album", "Abbey Road"), ("album", "Abbey Road"),
                               ("song", "Yesterday")])
  assert found == [("musicalartist", 2, 4), ("album", 5, 7), ("album", 8, 10), ("song", -1, -1)]


def test_postprocess_cuts_at_end_tokens_past_the_start():
  assert lg.postprocess(" booking;refund</s><pad>") == "booking;refund"
  assert lg.postprocess("</s>booking") == "</s>booking"  # an end token at index 0 is not a cut (the original's > 0)
  assert lg.postprocess("a\nb") == "a | b"


# --- the model ----------------------------------------------------------------------------------------

def tiny_backbone(tokenizer, hidden=16, embed_scale=1.0):
  cfg = llama.LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=hidden // 2, tie_word_embeddings=True)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  model.embed[...] = model.embed[...] * embed_scale  # larger logits: a loss that depends on which tokens count
  return weights.Backbone(model=model, config=cfg, tokenizer=tokenizer, model_type="llama", source="tiny")


def test_loss_is_the_mean_cross_entropy_of_the_target_tokens_only(smollm2_tokenizer):
  backbone = tiny_backbone(smollm2_tokenizer, embed_scale=30.0)
  gen = lg.LabelGenerator(backbone, lg.FinetuneConfig(params="prompt"))
  texts, targets = ["book a room for two nights please", "wifi?"], ["booking;how_long", ""]
  got = gen.loss(gen.batch(texts, targets, rows=3))  # a filler row that must not count

  # reference: each example alone, unpadded, tokenised here; numpy log-softmax
  tok, eos = smollm2_tokenizer, smollm2_tokenizer.eos_token_id
  prefix = np.asarray(gen.trainable["prompts"]["instruction"][...])[None]
  total = all_tokens = 0.0
  count = all_count = 0
  for text, target in zip(texts, targets):
    source = tok(text + "<label>", add_special_tokens=False)["input_ids"]
    label = tok(target, add_special_tokens=False)["input_ids"] + [eos]
    ids = np.asarray([source + label])
    logits = np.asarray(backbone.model(jnp.asarray(ids), jnp.ones(ids.shape, bool), embedded_prefix=jnp.asarray(prefix)),
                        np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -logp[np.arange(ids.shape[1] - 1), ids[0, 1:]]  # logits[t] predict token t + 1
    total += nll[len(source) - 1:].sum()
    count += len(label)
    all_tokens, all_count = all_tokens + nll.sum(), all_count + len(nll)
  assert abs(got - total / count) < 1e-4 * abs(total / count), (got, total / count)
  assert abs(total / count - all_tokens / all_count) > 0.05  # the mask matters: this test can fail


def toy_task():
  """Two intents whose utterances differ by one word."""
  train = [f"{p} {w}" for p in ("book the", "i want the", "where is the", "open the") for w in ("gym", "spa")]
  dev = [f"{p} {w}" for p in ("show me the", "is there a") for w in ("gym", "spa")]
  return train, [t.split()[-1] for t in train], dev, [t.split()[-1] for t in dev]
