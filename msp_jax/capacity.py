"""Will a run fit? The sequence a config lays out against the backbone's context length, and a
lower-bound memory estimate of one training step against the memory the machine has free. Both are
checked from the backbone's header (`weights.read_shape`) before any weight is loaded, so a prompt
too long for the model is a one-line error instead of minutes of loading and an out-of-memory kill.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

from msp_jax.data import user_files
from msp_jax.models.weights import BackboneShape, read_shape

# Attribute sets per dataset (the S axis of attribute ids): NLU++ and TOPv2 have intents and slots,
# CrossNER entity types. The concat mixer lays out S x max_mixture attribute prompts.
ATTRIBUTE_SETS = {"nlupp": 2, "crossner": 1, "topv2": 2}


def num_attribute_sets(c) -> int:
  """The benchmark's count, or the sets a files dataset's folder uses."""
  if c.dataset == "files":
    return len(user_files.read_folder(c.data_path).attributes)
  return ATTRIBUTE_SETS[c.dataset]


def check_fits(c, fail) -> None:
  """The prompt layout of config `c` against its backbone's context length, one training step against
  free memory; `fail(field, why)` raises the config error."""
  shape = read_shape(c.model)
  name = os.path.basename(shape.source.rstrip("/"))
  prefix = prefix_length(c.mixture, c.n_tokens, c.attribute_tokens, c.max_mixture, num_attribute_sets(c))
  length = prefix + max(c.buckets) + c.max_new_tokens
  if shape.context_length is not None and length > shape.context_length:
    room = shape.context_length - (length - c.n_tokens)
    fail("n_tokens", f"the sequence needs {length} positions (n_tokens {c.n_tokens} + {prefix - c.n_tokens} "
         f"attribute-prompt tokens for mixture {c.mixture} + longest bucket {max(c.buckets)} + max_new_tokens "
         f"{c.max_new_tokens}) but {name} allows {shape.context_length} (its context length); valid: "
         + (f"n_tokens <= {room} with these settings" if room >= 0 else
            "lower attribute_tokens, max_mixture, buckets or max_new_tokens"))
  compute = jnp.dtype(c.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
  param = jnp.dtype(c.param_dtype or compute)
  batch = per_device_batch(c.batch_size, c.model_parallel)
  need = step_bytes(shape, batch, prefix + max(c.buckets), compute.itemsize, param.itemsize)
  free, where = available_bytes()
  if need > free:
    fail("batch_size", f"one training step needs at least {gib(need)} ({name}: {shape.num_params:,} "
         f"weights, {shape.num_layers} layers; {batch} rows x {prefix + max(c.buckets)} positions) but "
         f"{where} is {gib(free)}; lower batch_size (raise grad_accum_steps), n_tokens or buckets")


def prefix_length(mixture: str, n_tokens: int, attribute_tokens: int, max_mixture: int, num_sets: int) -> int:
  """Soft-prompt positions before the text: the instruction, then the mixed attribute prompts."""
  if mixture == "none":
    return n_tokens
  if mixture == "concat":
    return n_tokens + num_sets * max_mixture * attribute_tokens
  return n_tokens + attribute_tokens


def step_bytes(shape: BackboneShape, batch: int, length: int, compute_bytes: int, param_bytes: int) -> int:
  """A lower bound on the memory of one training step, so that a refusal is certain, not a guess.
  Gradients flow through the frozen backbone to the prompts, so the backward pass needs, at least:
  the weights; each layer's input and output per token (2 x hidden values); the attention scores and
  their gradient of one layer at a time (2 x heads x length x length per row); fp32 logits over the
  vocabulary for the loss."""
  weights = shape.num_params * param_bytes
  layers = batch * length * shape.num_layers * 2 * shape.hidden_size * compute_bytes
  attention = batch * 2 * shape.num_heads * length * length * compute_bytes
  logits = batch * length * shape.vocab_size * 4
  return weights + layers + attention + logits


def available_bytes() -> tuple[int, str]:
  """(bytes free for the run, where the number comes from): the first accelerator's memory limit,
  or on CPU the host's available memory (and a cgroup limit, where one is set)."""
  if jax.default_backend() != "cpu":
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.device_kind} memory"
  free, where = _meminfo_available(), "available host memory (/proc/meminfo)"
  if free is None:
    free, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available host memory"
  limit = _cgroup_free()
  if limit is not None and limit < free:
    free, where = limit, "the container's memory limit (cgroup)"
  return free, where


def _meminfo_available() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _cgroup_free() -> int | None:
  for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                  "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    try:
      with open(limit_file) as f, open(usage_file) as g:
        limit, usage = f.read().strip(), int(g.read())
    except (OSError, ValueError):
      continue
    if limit.isdigit() and int(limit) < 2 ** 60:  # "max" or a huge number: no limit
      return int(limit) - usage
  return None


def gib(n: int) -> str:
  return f"{n / 2 ** 30:.1f} GiB"


def per_device_batch(batch_size: int, model_parallel: int) -> int:
  """Rows of the global batch one device holds on a (data, model) mesh."""
  data_parallel = max(1, jax.device_count() // max(1, model_parallel))
  return math.ceil(batch_size / data_parallel)
