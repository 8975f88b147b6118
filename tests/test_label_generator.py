"""The original's downstream protocol (label_generator.py): label strings written and parsed back as
the original post-processed them, the loss on the target tokens alone, learning a toy, and an epoch
chosen on dev only."""
import dataclasses

import jax
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
  # in the order written, never inside an entity found before; out of order still found
  stade = "The Stade de France in Paris , France"
  assert lg.locate(stade, [("location", "Stade de France"), ("country", "France")]) == [("location", 1, 4), ("country", 7, 8)]
  assert lg.locate(stade, [("country", "France"), ("location", "Stade de France")]) == [("country", 3, 4), ("location", -1, -1)]
  assert lg.locate(stade, [("city", "Paris"), ("location", "Stade de France")]) == [("city", 5, 6), ("location", 1, 4)]


def test_postprocess_cuts_at_end_tokens_past_the_start():
  assert lg.postprocess(" booking;refund</s><pad>") == "booking;refund"
  assert lg.postprocess("</s>booking") == "</s>booking"  # an end token at index 0 is not a cut (the original's > 0)
  assert lg.postprocess("a\nb") == "a | b"


# --- the model ----------------------------------------------------------------------------------------

def tiny_backbone(tokenizer, hidden=16, embed_scale=1.0, weight_scale=1.0):
  cfg = llama.LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=hidden // 2, tie_word_embeddings=True)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  model.embed[...] = model.embed[...] * embed_scale  # larger logits: a loss that depends on which tokens count
  for path, p in nnx.iter_graph(model):  # larger weights: outputs that differ between inputs
    if isinstance(p, nnx.Param) and p[...].ndim >= 2 and "embed" not in str(path):
      p[...] = p[...] * weight_scale
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


def test_decoding_writes_a_quarter_more_than_the_longest_training_label_in_steps_of_8(smollm2_tokenizer):
  gen = lg.LabelGenerator(tiny_backbone(smollm2_tokenizer), lg.FinetuneConfig(max_new_tokens=40))
  targets = ["booking", "booking;check_in;how_long;how_much;refund;when;wifi", ""]
  longest = len(smollm2_tokenizer(targets[1], add_special_tokens=False)["input_ids"]) + 1  # + EOS
  assert gen.decode_length(targets) == min(40, -(-int(1.25 * longest) // 8) * 8) and longest > 8
  assert gen.decode_length(["a"]) == 8  # 2 tokens: 2.5 -> 8
  assert gen.decode_length(["x " * 100]) == 40  # the cap


def test_rows_decoded_in_length_order_come_back_in_input_order(smollm2_tokenizer):
  """generate() sorts rows by length into calls of DECODE_BATCH: each string must return to its own row,
  equal to decoding that row alone (greedy, masked padding: a row's tokens do not depend on its batch)."""
  gen = lg.LabelGenerator(tiny_backbone(smollm2_tokenizer, hidden=32, embed_scale=3.0, weight_scale=3.0),
                          lg.FinetuneConfig(max_new_tokens=5))
  texts = ["a much longer utterance about booking a room for two nights in june", "wifi?",
           "can i check in early tomorrow", "spa", "is breakfast included in the price of the room"]
  together = gen.generate(texts)
  alone = [gen.generate([t])[0] for t in texts]
  assert together == alone and len(set(together)) == len(texts), together
  assert gen.generate([]) == []


@pytest.mark.parametrize("grouped", [True, False])
def test_training_batches_group_rows_of_similar_length(grouped, smollm2_tokenizer, monkeypatch):
  """With group_by_length each full training batch holds the next rows by length (in a random batch order),
  so it pads to its own rows; without, rows are a plain shuffle. Every row is trained on once an epoch."""
  gen = lg.LabelGenerator(tiny_backbone(smollm2_tokenizer), lg.FinetuneConfig(epochs=2, batch_size=3, max_new_tokens=2,
                                                                              group_by_length=grouped))
  words = ["wifi", "a room for two", "breakfast in the room at seven", "spa", "an extra bed for my daughter please",
           "late check out tomorrow", "pool", "do you have parking for a van", "gym hours", "taxi"]
  texts, targets = [f"{w}?" for w in words], ["booking"] * len(words)
  batches, batch = [], gen.batch

  def spy(texts, targets=None, rows=None):  # the rows of each training step (targets given), not of decoding
    if targets is not None:
      batches.append(list(texts))
    return batch(texts, targets, rows)

  monkeypatch.setattr(gen, "batch", spy)
  gen.fit(texts, targets, texts[:2], lambda written: 0.0)
  length = lambda t: len(smollm2_tokenizer(t + lg.SEPARATOR + "booking", add_special_tokens=False)["input_ids"])
  for epoch in (batches[:4], batches[4:]):
    assert sorted(t for b in epoch for t in b) == sorted(texts) and [len(b) for b in epoch] == [3, 3, 3, 1]
    spans = sorted((min(map(length, b)), max(map(length, b))) for b in epoch[:3])  # the full batches
    disjoint = all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert disjoint == grouped, spans


class Killed(Exception):
  """Stands for the process dying between two epochs."""


@pytest.mark.parametrize("params, scores", [("prompt", [0.2, 0.5, 0.1]), ("full", [0.1, 0.2, 0.5])])
def test_a_killed_fit_resumes_after_its_last_saved_epoch_to_the_same_parameters(params, scores, smollm2_tokenizer,
                                                                                  tmp_path, capsys):
  """With a checkpoint_dir, a fit killed after epoch 2 of 3 trains only epoch 3 when run again, and ends with
  the parameters, losses and chosen epoch of an unbroken fit: the best epoch restored from disk (first case) or
  the one just trained (second). A state made with another config is set aside, not resumed."""
  train, targets, dev, _ = toy_task()
  config = lg.FinetuneConfig(params=params, epochs=3, learning_rate=0.3, batch_size=3, max_new_tokens=2)
  backbone = tiny_backbone(smollm2_tokenizer, embed_scale=3.0, weight_scale=3.0)
  scorer = lambda values: (lambda written, it=iter(values): next(it))  # StopIteration if dev is scored once too often
  leaves = lambda gen: [np.asarray(x) for x in jax.tree.leaves(gen.trainable)]
  unbroken = lg.LabelGenerator(backbone, config).fit(train, targets, dev, scorer(scores))

  def die_after_epoch_2(h):
    if h["epoch"] == 2:
      raise Killed
  with pytest.raises(Killed):
    lg.LabelGenerator(backbone, config).fit(train, targets, dev, scorer(scores[:2]), die_after_epoch_2, str(tmp_path))
  trained = []
  resumed = lg.LabelGenerator(backbone, config).fit(train, targets, dev, scorer(scores[2:]), trained.append, str(tmp_path))
  assert [h["epoch"] for h in trained] == [3] and "resuming after epoch 2/3" in capsys.readouterr().out
  untimed = lambda gen: [{k: v for k, v in h.items() if not k.endswith("_seconds")} for h in gen.selection["history"]]
  assert untimed(resumed) == untimed(unbroken) and resumed.selection["epochs"] == unbroken.selection["epochs"] == 1 + scores.index(0.5)
  assert all(np.array_equal(a, b) for a, b in zip(leaves(resumed), leaves(unbroken)))
  assert not all(np.array_equal(a, b) for a, b in zip(leaves(resumed), leaves(lg.LabelGenerator(backbone, config))))

  again = lg.LabelGenerator(backbone, dataclasses.replace(config, learning_rate=0.1))
  again.fit(train, targets, dev, scorer(scores), None, str(tmp_path))  # all three epochs: a fresh state
  assert "made with other settings (config.learning_rate)" in capsys.readouterr().out
  assert [p.name for p in tmp_path.iterdir() if ".stale-" in p.name and not p.name.endswith(".json")]


def toy_task(words=("gym", "spa")):
  """Two intents whose utterances differ by one word."""
  train = [f"{p} {w}" for p in ("book the", "i want the", "where is the", "open the") for w in words]
  dev = [f"{p} {w}" for p in ("show me the", "is there a") for w in words]
  return train, [t.split()[-1] for t in train], dev, [t.split()[-1] for t in dev]


def finetune_config(**extra):
  from ml_collections import ConfigDict
  c = ConfigDict({"downstream": "finetune", "finetune_params": "prompt", "finetune_epochs": 2, "finetune_lr": 0.3,
                  "finetune_batch_size": 4, "finetune_max_new_tokens": 6, "finetune_repetition_penalty": 1.2})
  c.update(extra)
  return c


def test_test_labels_never_choose_the_epoch(smollm2_tokenizer, load_task):
  """NLU++ through the grid's entry point: scoring a test split with its label sets shuffled among the
  examples leaves every per-epoch dev score and the chosen epoch as they were."""
  import dataclasses
  from msp_jax import experiment, task_models
  task = load_task("nlupp", "hotels", "few_shot")
  cache = task_models.FeatureCache(tiny_backbone(smollm2_tokenizer, embed_scale=30.0))
  records = [experiment.example_record(ex) for ex in task.splits["train"][:8]]
  dev, test = list(task.splits["dev"][:4]), list(task.splits["test"][:4])
  shuffled = [dataclasses.replace(ex, attributes=test[j].attributes) for ex, j in zip(test, [1, 2, 3, 0])]
  assert [ex.attributes for ex in shuffled] != [ex.attributes for ex in test]
  runs = [task_models.downstream_run(task, cache, finetune_config(), 0, {"": records}, dev, t)[1] for t in (test, shuffled)]
  untimed = lambda chosen: {**chosen, "history": [{k: v for k, v in h.items() if not k.endswith("_seconds")}
                                                  for h in chosen["history"]]}
  assert untimed(runs[0]["selection"]["intents"]) == untimed(runs[1]["selection"]["intents"])
  chosen = runs[0]["selection"]["intents"]
  assert chosen["dev_metric"] == "micro_f1" and chosen["epochs"] in (1, 2) and len(chosen["history"]) == 2
  assert chosen["dev_score"] == max(h["dev_score"] for h in chosen["history"])
  assert set(runs[0]["scores"]) == {"micro_f1", "macro_f1", "micro_precision", "micro_recall", "intent_f1_original",
                                    "general_intent_f1", "general_intent_f1_original"}


def test_the_epoch_is_chosen_on_a_seeded_dev_sample_the_same_for_every_row(smollm2_tokenizer, load_task, monkeypatch):
  """finetune_dev_max=n: each epoch decodes the same seeded n dev sentences (not the first n), whatever the
  row's seed; 0 or n >= the split keeps every one. The selection records how many chose the epoch."""
  from msp_jax import experiment, task_models
  task = load_task("crossner", "politics", "few_shot")
  dev = list(task.splits["dev"])
  sample = task_models.epoch_choice_dev(finetune_config(finetune_dev_max=5), dev)
  positions = [dev.index(ex) for ex in sample]
  assert len(set(positions)) == 5 and positions == sorted(positions) and positions != list(range(5))
  for keep_all in (finetune_config(), finetune_config(finetune_dev_max=0), finetune_config(finetune_dev_max=len(dev))):
    assert task_models.epoch_choice_dev(keep_all, dev) == dev
  decoded = []
  generate = lg.LabelGenerator.generate
  monkeypatch.setattr(lg.LabelGenerator, "generate", lambda self, texts: decoded.append(list(texts)) or generate(self, texts))
  cache = task_models.FeatureCache(tiny_backbone(smollm2_tokenizer, embed_scale=30.0))
  records = [experiment.example_record(ex) for ex in task.splits["train"][:4]]
  c = finetune_config(finetune_dev_max=3)
  want = [ex.text for ex in task_models.epoch_choice_dev(c, dev[:20])]
  for seed in (0, 1):
    decoded.clear()
    model = task_models.GeneratedEntityModel(task, cache, c, seed).fit(records, dev[:20])
    assert decoded == [want, want] and len(want) == 3 and want != [ex.text for ex in dev[:3]]
    assert model.selection["entities"]["dev_examples"] == 3
  with pytest.raises(task_models.SelectionError, match=r"^config.finetune_dev_max=-1: must be an integer >= 0"):
    task_models.check_downstream(finetune_config(finetune_dev_max=-1), ["crossner"])


def test_written_pieces_that_name_no_intent_are_false_positives(smollm2_tokenizer, load_task):
  """The scores of a finetuned label writer count every written piece that names no intent as a false
  positive, as the original's scoring did (they were dropped before); domain adaptation selects the
  epoch on general_intent_f1, the score that setting is ranked by."""
  from msp_jax import experiment, task_models
  task = load_task("nlupp", "hotels", "few_shot")
  cache = task_models.FeatureCache(tiny_backbone(smollm2_tokenizer, embed_scale=30.0))
  records = [experiment.example_record(ex) for ex in task.splits["train"][:8]]
  dev = list(task.splits["dev"][:4])
  test = [ex for ex in task.splits["test"] if ex.attributes["intents"]][:4]
  model = task_models.GeneratedIntentModel(task, cache, finetune_config(finetune_epochs=1), 0).fit(records, dev)
  # what a writer that gets every intent right but adds one piece naming none writes in two of four
  written = [model.strings.format(ex.attributes["intents"]) + ("; not an intent" if i % 2 else "")
             for i, ex in enumerate(test)]
  model.generator.generate = lambda texts: written[:len(texts)]
  tp = sum(len(ex.attributes["intents"]) for ex in test)
  scores = model.score(test)
  assert scores["micro_precision"] == pytest.approx(tp / (tp + 2)) and scores["micro_recall"] == 1.0
  assert scores["micro_f1"] == pytest.approx(2 * tp / (2 * tp + 2)) and model.dropped == 2
  assert scores["intent_f1_original"] < 1.0
  source = task_models.GeneratedIntentModel(task, cache, finetune_config(finetune_epochs=1, source_data=True), 0)
  assert source.fit(records, dev).selection["intents"]["dev_metric"] == "general_intent_f1"


def test_topv2_or_a_bad_value_is_a_one_line_error_naming_the_field():
  from msp_jax import task_models
  with pytest.raises(task_models.SelectionError, match=r"^config.downstream='finetune' writes NLU\+\+ and CrossNER"):
    task_models.check_downstream(finetune_config(), ["nlupp", "topv2"])
  with pytest.raises(task_models.SelectionError, match=r"^config.downstream='tune': valid: probe, finetune$"):
    task_models.check_downstream(finetune_config(downstream="tune"), ["nlupp"])
  with pytest.raises(lg.FinetuneError, match=r"^config.finetune_params='all': valid: prompt, full$"):
    task_models.check_downstream(finetune_config(finetune_params="all"), ["nlupp"])
  with pytest.raises(lg.FinetuneError, match=r"^config.finetune_epochs=0: must be >= 1$"):
    task_models.check_downstream(finetune_config(finetune_epochs=0), ["crossner"])


def test_prompt_variant_learns_to_write_labels_and_leaves_the_backbone_alone(tiny_t5_tokenizer):
  """A 32-wide random Llama (its 300-token vocabulary: fast) cannot be steered to copy a word by a
  prompt alone, but a trained prompt makes it write a valid label: dev micro F1 goes from 0 (the untrained
  prompt writes no label) to above 0 (valid intents written) within twelve (short) epochs; the backbone is untouched."""
  cfg = llama.LlamaConfig(vocab_size=len(tiny_t5_tokenizer), hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  for path, p in nnx.iter_graph(model):  # larger weights: logits a prompt can move (HF init gives near-uniform ones)
    if isinstance(p, nnx.Param) and p[...].ndim >= 2:
      p[...] = p[...] * (10.0 if "embed" in str(path) else 3.0)
  before = {str(k): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  backbone = weights.Backbone(model=model, config=cfg, tokenizer=tiny_t5_tokenizer, model_type="llama", source="tiny")
  train, targets, dev, dev_gold = toy_task(("hot", "today"))
  strings = lg.IntentStrings(["hot", "today"])

  def dev_score(written):
    from msp_jax.metrics import task_scores
    return task_scores.multilabel_prf([{g} for g in dev_gold], [strings.parse(w)[0] for w in written])["micro_f1"]

  gen = lg.LabelGenerator(backbone, lg.FinetuneConfig(params="prompt", epochs=12, learning_rate=0.5, batch_size=4,
                                                      max_new_tokens=4, repetition_penalty=1.0))
  assert dev_score(gen.generate(dev)) == 0.0
  gen.fit(train, targets, dev, dev_score)
  scores = [h["dev_score"] for h in gen.history]
  assert max(scores) > 0.0 and gen.selection["dev_score"] == max(scores), gen.history
  assert gen.history[-1]["train_loss"] < gen.history[0]["train_loss"], gen.history
  after = {str(k): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert all(np.array_equal(before[k], after[k]) for k in before)
