"""Tokenizers: a Hugging Face folder's own files, or rebuilt from a GGUF file's vocabulary.

transformers can read a GGUF tokenizer only with torch installed; we need none, so a byte-level
BPE GGUF vocabulary (GPT-2, SmolLM, Llama 3, Qwen2 style) is rebuilt with `tokenizers` here.
"""
from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from msp_jax.errors import BackboneError

_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_end|>

# How each GGUF `tokenizer.ggml.pre` splits text before BPE (llama.cpp's llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT],
    # SmolLM splits every digit first (its tokenizer.json: Digits(individual_digits=True)).
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT], "qwen2": [_QWEN2_SPLIT],
}


def load_hf_tokenizer(folder: str):
  """The tokenizer saved in a Hugging Face folder, or None when the folder has none."""
  if not any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
    return None
  if _tokenizer_class(folder) in _GENERIC_CLASSES:  # what AutoTokenizer would build, without importing it
    return PreTrainedTokenizerFast.from_pretrained(folder)
  # Imported here, not at the top: AutoTokenizer imports torch when it is installed (seconds per
  # process), and neither the default GGUF backbone nor a generic tokenizer.json needs it.
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(folder)


# The names transformers saves for its generic tokenizers.json-backed class (v5 and v4 spellings).
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _tokenizer_class(folder: str) -> str | None:
  try:
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
      return json.load(f).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    return None


def load_gguf_tokenizer(path: str, fields: dict | None = None) -> PreTrainedTokenizerFast:
  """The tokenizer a GGUF file describes, as a transformers fast tokenizer (no torch needed).

  `fields` are the file's metadata values, if already read (see `weights.read_gguf`).
  """
  if fields is None:
    from gguf import GGUFReader
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
  kind, pre = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre", "default")
  if kind != "gpt2":
    raise BackboneError(f"{path}: GGUF tokenizer.ggml.model={kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
  if pre not in _PRE_SPLITS:
    raise BackboneError(f"{path}: GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: {sorted(_PRE_SPLITS)}")
  tokens = list(fields["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[pre]]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  types = np.asarray(fields.get("tokenizer.ggml.token_type", np.zeros(len(tokens))))
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _CONTROL])
  special = {name: tokens[int(fields[f"tokenizer.ggml.{key}"])]
             for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                               ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
             if f"tokenizer.ggml.{key}" in fields}
  return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=fields.get("tokenizer.chat_template"),
                                 clean_up_tokenization_spaces=False, **special)
