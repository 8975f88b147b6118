"""What a benchmark ran on: the CPU model and its vector extensions, cores, the JAX device.

Speed numbers hold for one CPU kind only (an AVX2-only AMD core and an AVX-512/AMX Intel core differ by
up to 2x for the same XLA program), so every benchmark prints and records this first.
"""
import os
import platform

import jax

from msp_jax.models.weights import DEFAULT_BACKBONE

# The extensions that decide XLA:CPU's and oneDNN's matmul kernels, in /proc/cpuinfo's spelling.
VECTOR_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info() -> dict:
  """Model name and vector extensions from /proc/cpuinfo (Linux); the platform string elsewhere."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  return {"cpu": model, "vector_extensions": [x for x in VECTOR_EXTENSIONS if x in flags],
          "cpu_kind": cpu_kind(flags), "cores": os.cpu_count()}


def cpu_kind(flags) -> str:
  """The class README's speed tables are kept per: AMX, AVX-512, AVX2 or older."""
  if "amx_tile" in flags:
    return "AVX-512+AMX"
  if "avx512f" in flags:
    return "AVX-512"
  return "AVX2" if "avx2" in flags else "pre-AVX2"


def add_backbone_argument(parser) -> None:
  """`--backbone`: what every benchmark loads (default: the SmolLM2 GGUF)."""
  parser.add_argument("--backbone", default=DEFAULT_BACKBONE,
                      help="a backbone name, .gguf or HF folder (e.g. benchmarks/random_checkpoint.py's)")


def describe() -> dict:
  device = jax.devices()[0]
  return {**cpu_info(), "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
          "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def flops_per_token(config, context: int) -> float:
  """Model FLOPs (2 per multiply-add) of one token's forward through a Llama-family decoder: the
  weight matmuls and the LM head, plus attention scores and values over `context` positions."""
  d, layers, q, kv = config.hidden_size, config.num_layers, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  weights = layers * (2 * d * q + 2 * d * kv + 3 * d * config.intermediate_size) + d * config.vocab_size
  return 2 * weights + 4 * layers * context * q


def utilisation(flops: float, seconds: float, peak_tflops: float | None) -> dict:
  """Achieved TFLOP/s and, given the device's peak, model FLOPs utilisation (MFU)."""
  achieved = flops / seconds / 1e12
  return {"tflops": round(achieved, 4), **({"mfu": round(achieved / peak_tflops, 4)} if peak_tflops else {})}


if __name__ == "__main__":
  print(describe())
