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
from msp_jax.data import load_task

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
  assert summary["kept"] + sum(summary["removed"].values()) == summary["candidates"]
  assert summary["removed"].get("noise", 0) >= 1  # denoising really filters
  candidates = read_jsonl(output + ".candidates")  # per-attribute counts, before and after, counted here by hand
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
