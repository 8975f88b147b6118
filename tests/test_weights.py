"""Checkpoint loading: sharded folders, and a one-line error for each kind of bad input."""
import json
import os
import subprocess
import sys

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import msp_jax
from msp_jax.errors import BackboneError
from msp_jax.models.tokenizer import load_hf_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  cfg = transformers.LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  folder = tmp_path_factory.mktemp("tiny")
  model.save_pretrained(folder, safe_serialization=True)
  sharded = tmp_path_factory.mktemp("sharded")
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
  return folder, sharded


def edited_copy(src, dst, config=None, drop=None, reshape=None):
  """A copy of checkpoint folder `src` with config fields changed or one tensor dropped."""
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    hf = json.load(f)
  hf.update(config or {})
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(hf, f)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  if drop:
    del tensors[drop]
  if reshape:
    name, shape = reshape
    tensors[name] = np.zeros(shape, np.float32)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  return str(dst)


def one_line_error(exc_info, *fragments):
  message = str(exc_info.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, (fragment, message)


def test_sharded_checkpoint_loads_like_a_single_file(tiny_folder):
  folder, sharded = tiny_folder
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  ids = jnp.asarray([[3, 9, 27, 4, 50]])
  a = msp_jax.load_backbone(str(folder), dtype=jnp.float32).model(ids)
  b = msp_jax.load_backbone(str(sharded), dtype=jnp.float32).model(ids)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_model_type(tiny_folder, tmp_path):
  path = edited_copy(tiny_folder[0], tmp_path / "bert", config={"model_type": "bert"})
  with pytest.raises(BackboneError) as e:
    msp_jax.load_backbone(path)
  one_line_error(e, path, "'bert'", "supported", "llama", "gpt2", "t5")


def test_missing_tensor(tiny_folder, tmp_path):
  name = "model.layers.1.mlp.up_proj.weight"
  path = edited_copy(tiny_folder[0], tmp_path / "missing", drop=name)
  with pytest.raises(BackboneError) as e:
    msp_jax.load_backbone(path)
  one_line_error(e, path, name, "missing")


def test_shape_mismatch(tiny_folder, tmp_path):
  path = edited_copy(tiny_folder[0], tmp_path / "shape", reshape=("lm_head.weight", (67, 16)))
  with pytest.raises(BackboneError) as e:
    msp_jax.load_backbone(path)
  one_line_error(e, path, "lm_head", "(16, 67)", "(32, 67)")


def test_config_that_does_not_fit_the_tensors(tiny_folder, tmp_path):
  path = edited_copy(tiny_folder[0], tmp_path / "cfg", config={"intermediate_size": 40})
  with pytest.raises(BackboneError) as e:
    msp_jax.load_backbone(path)
  one_line_error(e, path, "w_down", "(2, 48, 32)", "(2, 40, 32)")


def test_missing_file():
  with pytest.raises(BackboneError) as e:
    msp_jax.load_backbone("/nonexistent/model.gguf")
  one_line_error(e, "/nonexistent/model.gguf", "no such file")


def test_folder_without_config(tmp_path):
  with pytest.raises(BackboneError) as e:
    msp_jax.load_backbone(str(tmp_path))
  one_line_error(e, str(tmp_path), "config.json")


def test_hub_id_without_network(monkeypatch):
  import huggingface_hub.constants
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(BackboneError) as e:
    msp_jax.load_backbone("HuggingFaceTB/SmolLM2-135M-Instruct")
  one_line_error(e, "HuggingFaceTB/SmolLM2-135M-Instruct", "cannot download", "no network")


def write_gguf(path, qtype, d=64, ff=128, vocab=8):
  """A one-layer llama GGUF whose embedding is stored in quantisation type `qtype` (zero bytes)."""
  w = gguf.GGUFWriter(str(path), "llama")
  for key, value in (("block_count", 1), ("embedding_length", d), ("feed_forward_length", ff),
                     ("attention.head_count", 4), ("attention.head_count_kv", 4), ("context_length", 64)):
    w.add_uint32(f"llama.{key}", value)
  w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  w.add_tensor("token_embd.weight", np.zeros((vocab, d // block * size), np.uint8), raw_dtype=qtype)
  rng = np.random.default_rng(0)
  shapes = {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d), "ffn_gate": (ff, d),
            "ffn_up": (ff, d), "ffn_down": (d, ff), "attn_norm": (d,), "ffn_norm": (d,)}
  for name, shape in shapes.items():
    w.add_tensor(f"blk.0.{name}.weight", rng.normal(size=shape).astype(np.float32))
  w.add_tensor("output_norm.weight", np.ones(d, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_unsupported_gguf_quantisation(tmp_path):
  path = write_gguf(tmp_path / "q8k.gguf", gguf.GGMLQuantizationType.Q8_K)
  with pytest.raises(BackboneError) as e:
    msp_jax.load_backbone(path, with_tokenizer=False)
  one_line_error(e, path, "token_embd.weight", "Q8_K", "supported", "Q4_1")


def test_supported_gguf_quantisation_loads(tmp_path):
  path = write_gguf(tmp_path / "q4.gguf", gguf.GGMLQuantizationType.Q4_1)
  backbone = msp_jax.load_backbone(path, with_tokenizer=False)
  assert backbone.config.num_layers == 1 and backbone.model.embed[...].shape == (8, 64)
  assert backbone.model(jnp.asarray([[1, 2, 3]])).shape == (1, 3, 8)


def test_a_generic_tokenizer_folder_loads_as_autotokenizer_would_without_importing_torch(tiny_model_dir):
  """Every train.py / generate.py on such a folder would otherwise pay torch's import (AutoTokenizer's)."""
  ours, ref = load_hf_tokenizer(str(tiny_model_dir)), transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  assert type(ours) is type(ref)
  for text in ("Hello world, how are you?", "Stade de France 2003: ü é ß", "<|im_end|> 12345\n\tx"):
    assert ours(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
  assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (ref.eos_token_id, ref.pad_token_id, ref.bos_token_id)
  code = ("import sys; from msp_jax.models.tokenizer import load_hf_tokenizer; "
          f"load_hf_tokenizer({str(tiny_model_dir)!r}); assert 'torch' not in sys.modules, 'torch imported'")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
