"""`generate.py` end to end: a trained workdir becomes a labelled JSONL; interrupted runs resume to
the same file; bad input is a one-line error with nothing written."""
import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import common
from msp_jax import synthesis, trainer
from msp_jax import data as msp_data
from msp_jax.data import load_task
from msp_jax.data.batching import mixture_bucket, row_length

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_KEYS = {"text", "attributes", "values", "spans", "domain", "seed_id", "kind", "method", "decoding", "noise"}


def flags(model_dir, workdir, **extra):
  f = dict(model=model_dir, workdir=workdir, n_tokens=4, batch_size=2, max_steps=2, eval_every=2, eval_batches=1,
           bleu_examples=0, max_new_tokens=6, checkpoint_every=1, warmup_steps=1, max_seeds=4, num_generations=2,
           gen_batch_size=4)
  f.update(extra)
  return [f"--config.{k}={v}" for k, v in f.items()]


def run(script, flag_list, mixture="pooling"):
  return subprocess.Popen([sys.executable, script, f"--config=configs/{mixture}.py", *flag_list], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, ok=True):
  out, _ = proc.communicate(timeout=900)
  assert (proc.returncode == 0) == ok, out[-3000:]
  return out


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  finish(run("train.py", flags(tiny_model_dir, workdir)))
  return workdir


def read_jsonl(path):
  return [json.loads(line) for line in open(path)]


def check_records(records, ontology_names, seed_ids, method, max_new_tokens=6):
  assert records
  for r in records:
    assert set(r) == RECORD_KEYS and r["method"] == method and r["domain"] == "hotels"
    assert r["text"] and r["seed_id"] in seed_ids and isinstance(r["noise"], float)
    assert set(r["attributes"]) == {"intents"} and set(r["attributes"]["intents"]) <= ontology_names
    assert r["decoding"]["do_sample"] is True and r["decoding"]["max_new_tokens"] == max_new_tokens


def test_generate_writes_labelled_jsonl(trained, tiny_model_dir, tmp_path, load_task):
  output = str(tmp_path / "out.jsonl")
  out = finish(run("generate.py", flags(tiny_model_dir, trained, output=output)))
  assert f"to {output}" in out.strip().splitlines()[-1]
  task = load_task("nlupp", "hotels", "few_shot")
  names = set(task.ontology["intents"].names)
  seeds = {ex.uid for ex in list(task.splits["train"])[:4]}
  records = read_jsonl(output)
  check_records(records, names, seeds, "msp")
  summary = json.load(open(output + ".summary.json"))
  assert summary["candidates"] == 8 and summary["kept"] == len(records)
  trained_run = json.load(open(os.path.join(trained, "summary.json")))  # the trainer's record of the generating prompts
  assert summary["prompt_run"] == {k: trained_run[k] for k in ("seconds", "select_metric", "best", "best_step", "step")}
  assert summary["kept"] + sum(summary["removed"].values()) == summary["candidates"]
  assert summary["removed"].get("noise", 0) >= 1  # denoising really filters
  _, *candidates = progress_lines(output + ".candidates")  # per-attribute counts, before and after, counted here by hand
  for counts, rows in (("before", candidates), ("after", records)):
    expected = collections.Counter(n for r in rows for n in r["attributes"]["intents"])
    assert summary["attribute_counts"][counts] == {"intents": dict(expected)}
  assert f"  intents/{min(expected)}: " in out
  assert 1 <= summary["compilations"] <= 3


def test_in_context_baseline_needs_no_checkpoint(tiny_model_dir, tmp_path, load_task):
  workdir = str(tmp_path / "icl")
  finish(run("generate.py", flags(tiny_model_dir, workdir, method="in_context")))
  task = load_task("nlupp", "hotels", "few_shot")
  records = read_jsonl(os.path.join(workdir, "synthetic", "in_context.jsonl"))
  check_records(records, set(task.ontology["intents"].names), {ex.uid for ex in task.splits["train"]}, "in_context")


def test_interrupted_generation_resumes_to_the_same_file(trained, tiny_model_dir, tmp_path):
  extra = dict(max_seeds=8, gen_batch_size=2)  # 8 chunks
  straight, killed = str(tmp_path / "straight.jsonl"), str(tmp_path / "killed.jsonl")
  finish(run("generate.py", flags(tiny_model_dir, trained, output=straight, **extra)))
  proc = run("generate.py", flags(tiny_model_dir, trained, output=killed, **extra))
  progress, deadline = killed + ".candidates", time.time() + 600
  while time.time() < deadline and not (os.path.exists(progress) and len(open(progress).readlines()) >= 4):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(killed), "killed before the end: no output file yet"
  out = finish(run("generate.py", flags(tiny_model_dir, trained, output=killed, **extra)))
  assert "resuming: " in out
  assert open(killed).read() == open(straight).read()


@pytest.mark.parametrize("case", ["no_checkpoint", "other_backbone", "unknown_attribute", "bad_method"])
def test_bad_input_is_a_one_line_error_and_writes_nothing(case, trained, tiny_model_dir, tmp_path):
  output = str(tmp_path / "never" / "out.jsonl")
  f = {"no_checkpoint": flags(tiny_model_dir, str(tmp_path / "empty"), output=output),
       "other_backbone": flags("smollm2-135m-instruct", trained, output=output),
       "unknown_attribute": flags(tiny_model_dir, trained, output=output, domain="banking"),
       "bad_method": flags(tiny_model_dir, trained, output=output, method="magic")}[case]
  last = finish(run("generate.py", f), ok=False).strip().splitlines()[-1]
  expected = {"no_checkpoint": "no trained checkpoint there", "other_backbone": "backbone_fingerprint",
              "unknown_attribute": "is not in the trained vocabulary", "bad_method": "valid: msp, in_context"}[case]
  assert last.startswith("error: ") and expected in last, last
  assert not os.path.exists(os.path.dirname(output))


def test_short_real_run_with_smollm2(tmp_path):
  """SmolLM2-135M on NLU++ hotels: a few prompt-tuning steps, then generation: valid labelled JSONL."""
  c = common.get_config(mixture="attention")
  c.update(workdir=str(tmp_path / "real"), n_tokens=8, batch_size=2, max_steps=2, eval_every=2, eval_batches=1,
           bleu_examples=0, warmup_steps=1, max_seeds=4, num_generations=2, gen_batch_size=8, max_new_tokens=24)
  trainer.train(c)
  summary = synthesis.synthesize(c)
  task = load_task("nlupp", "hotels", "few_shot")
  records = read_jsonl(summary["output"])
  check_records(records, set(task.ontology["intents"].names), {ex.uid for ex in task.splits["train"]}, "msp",
                max_new_tokens=24)
  assert all("\n" not in r["text"] for r in records)
  print("\n".join(r["text"] for r in records))


def test_t5_backbone_trains_evaluates_and_generates(tiny_t5_tokenizer, tmp_path):
  """The encoder-decoder path end to end: prompts on the encoder side, dev BLEU and generation
  through the sampler's T5 loop."""
  import torch
  import transformers
  folder = str(tmp_path / "tiny_t5")
  cfg = transformers.T5Config(vocab_size=len(tiny_t5_tokenizer), d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
                              num_heads=4, d_kv=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  torch.manual_seed(0)
  transformers.T5ForConditionalGeneration(cfg).save_pretrained(folder, safe_serialization=True)
  tiny_t5_tokenizer.save_pretrained(folder)
  c = common.get_config(mixture="bottleneck")
  c.update(model=folder, workdir=str(tmp_path / "run"), n_tokens=4, batch_size=2, max_steps=2, eval_every=2,
           eval_batches=1, bleu_examples=2, warmup_steps=1, max_seeds=2, num_generations=2, gen_batch_size=4,
           max_new_tokens=6)
  summary = trainer.train(c)
  assert "dev_bleu" in summary["last_eval"]
  result = synthesis.synthesize(c)
  assert result["candidates"] == 4 and result["kept"] + sum(result["removed"].values()) == 4


# --- no stale reuse: the progress file is keyed by what made it --------------------------------------

def tiny_config(model_dir, workdir, tfds_dir, **extra):
  c = common.get_config(mixture="pooling")
  c.update(model=model_dir, workdir=str(workdir), data_dir=tfds_dir, n_tokens=4, batch_size=2, max_steps=2, eval_every=2,
           eval_batches=1, bleu_examples=0, max_new_tokens=6, checkpoint_every=1, warmup_steps=1, max_seeds=4,
           num_generations=2, gen_batch_size=4, checkpoint="latest")
  c.update(extra)
  return c


def progress_lines(path):
  return [json.loads(line) for line in open(path)]


def test_more_training_regenerates_and_keeps_the_old_candidates_aside(trained_in_process, tmp_path, capsys):
  c = trained_in_process.copy_and_resolve_references()
  c.update(workdir=str(tmp_path / "run"), decay="constant")  # a schedule a run may be extended under
  trainer.train(c)
  first = synthesis.synthesize(c)
  c.max_steps = 4
  trainer.train(c)  # training goes on in the same workdir
  capsys.readouterr()
  second = synthesis.synthesize(c)
  out = capsys.readouterr().out
  assert (first["checkpoint_step"], second["checkpoint_step"]) == (2, 4)
  assert "resuming" not in out and "checkpoint_step" in out and "generating afresh" in out
  progress = second["output"] + ".candidates"
  (stale,) = [f for f in os.listdir(os.path.dirname(progress)) if ".candidates.stale-" in f]
  assert first["key"][:8] != second["key"][:8]
  header, *records = progress_lines(progress)
  assert header["made_by"]["checkpoint_step"] == 4 and header["made_by"]["prompts"] != first["made_by"]["prompts"]
  assert sorted(r["request"] for r in records) == list(range(8))
  assert len(progress_lines(os.path.join(os.path.dirname(progress), stale))) == 1 + 8  # the old run, untouched


@pytest.fixture(scope="module")
def trained_in_process(tiny_model_dir, tmp_path_factory, tfds_dir):
  c = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("trained") / "run", tfds_dir)
  trainer.train(c)
  return c


@pytest.mark.parametrize("change,regenerates", [
    (dict(temperature=1.3), True), (dict(seed=1), True), (dict(num_generations=3), True),
    (dict(keep_fraction=0.5), False), (dict(gen_batch_size=2), False)])
def test_changed_settings_regenerate_unless_they_only_denoise_or_batch(change, regenerates, trained_in_process, tmp_path,
                                                                       capsys):
  c = trained_in_process.copy_and_resolve_references()
  c.output = str(tmp_path / "out.jsonl")
  first = synthesis.synthesize(c)
  c.update(change)
  capsys.readouterr()
  second = synthesis.synthesize(c)
  out = capsys.readouterr().out
  assert ("generating afresh" in out) == regenerates and ("resuming: 8 of 8" in out) == (not regenerates), out
  assert (second["key"] != first["key"]) == ("gen_batch_size" not in change)  # batching is not what made the output
  assert json.load(open(second["output"] + ".summary.json"))["made_by"] == second["made_by"]


def test_resume_with_another_gen_batch_size_keeps_the_done_requests(trained_in_process, tmp_path, capsys):
  c = trained_in_process.copy_and_resolve_references()
  c.update(output=str(tmp_path / "out.jsonl"), gen_batch_size=2)
  first = synthesis.synthesize(c)
  progress = first["output"] + ".candidates"
  header, *written = open(progress).readlines()
  with open(progress, "w") as f:  # killed after the first record of the second chunk (of 2) was written
    f.writelines([header] + written[:3])
  c.gen_batch_size = 4
  capsys.readouterr()
  synthesis.synthesize(c)
  out = capsys.readouterr().out
  assert "resuming: 2 of 8 requests" in out, out
  records = [r for r in progress_lines(progress) if "request" in r]
  assert sorted(r["request"] for r in records) == list(range(8))  # each request once, none mis-assigned
  assert records[:2] == [json.loads(line) for line in written[:2]]  # the whole chunk was kept, not redone
  assert {tuple(r["chunk"]) for r in records[2:]} == {(4, 0), (4, 1)}


def test_prompts_and_texts_do_not_depend_on_the_batch_they_are_generated_in(trained_in_process, tmp_path):
  """Each request draws its exemplars and its tokens from its own streams: cut into chunks of 2 or of 3
  (other companions, other padding rows), every request gets the same prompt and writes the same text."""
  c = trained_in_process.copy_and_resolve_references()
  assert c.do_sample
  made = {}
  for size in (2, 3):
    c.update(output=str(tmp_path / f"b{size}.jsonl"), gen_batch_size=size)
    progress = synthesis.synthesize(c)["output"] + ".candidates"
    made[size] = {r["request"]: (r["exemplars"], r["text"]) for r in progress_lines(progress) if "request" in r}
  assert len(made[2]) == 8 and made[2] == made[3]
  assert len({text for _, text in made[2].values()}) > 1  # sampled, not one text for all


@pytest.mark.parametrize("mixture", ["pooling", "concat"])
def test_chunks_are_cut_in_padding_order(mixture, trained_in_process, tmp_path, monkeypatch):
  """Each chunk's rows are the next ones in padding order, so no chunk pads a short row to a long one that a
  later chunk could have taken: prompt tokens, and for concat (N prefix tokens per attribute slot) first the
  attribute slots."""
  c = trained_in_process.copy_and_resolve_references()
  c.update(output=str(tmp_path / "out.jsonl"), gen_batch_size=3, max_seeds=6)
  if mixture != c.mixture:
    c.update(mixture=mixture, workdir=str(tmp_path / mixture))
    trainer.train(c)
  chunks, make_batch = [], msp_data.make_batch

  def spy(segments, tokenizer, config, *args, **kw):  # what each sampler call was built from
    chunks.append([(mixture_bucket(max(map(len, s.attribute_ids)), config), row_length(s, tokenizer)) for s in segments])
    return make_batch(segments, tokenizer, config, *args, **kw)

  monkeypatch.setattr(msp_data, "make_batch", spy)
  synthesis.synthesize(c)
  assert [len(rows) for rows in chunks] == [3, 3, 3, 3]  # 12 requests
  assert len({slots for rows in chunks for slots, _ in rows}) > 1 and len({t for rows in chunks for _, t in rows}) > 3
  key = (lambda w: w) if mixture == "concat" else (lambda w: w[1])
  for a, b in zip(chunks, chunks[1:]):
    assert max(map(key, a)) <= min(map(key, b)), chunks
