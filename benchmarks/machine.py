"""What a benchmark ran on: the CPU model, family and vector extensions, cores, the JAX device.

Speed numbers hold for one CPU kind only (an AVX2-only AMD core and an AVX-512/AMX Intel core differ by
up to 2x for the same XLA program), so every benchmark prints and records this first. The vector
extensions alone do not name the kind: a Zen 4 core runs AVX-512 on 256-bit units, a Zen 5 core on
512-bit ones, and a VM names both "AMD EPYC"; so the family / model numbers are recorded too.
"""
import os
import platform

import jax

from msp_jax.models.weights import DEFAULT_BACKBONE

# The extensions that decide XLA:CPU's and oneDNN's matmul kernels, in /proc/cpuinfo's spelling.
VECTOR_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info() -> dict:
  """Model name, family / model, Zen generation and vector extensions from /proc/cpuinfo (Linux); the
  platform string elsewhere."""
  fields, flags = {}, set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
          flags = set(value.split())
          break
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  family, model = fields.get("cpu family"), fields.get("model")
  return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
          "family_model": f"{family}/{model}" if family and model else None,
          "microarchitecture": amd_zen(fields.get("vendor_id"), family, model),
          "vector_extensions": [x for x in VECTOR_EXTENSIONS if x in flags],
          "cpu_kind": cpu_kind(flags), "cores": os.cpu_count()}


def amd_zen(vendor, family, model) -> str | None:
  """The Zen generation of an AMD core from /proc/cpuinfo's family and model (AMD's published ranges);
  None for other vendors or unknown numbers."""
  if vendor != "AuthenticAMD" or not (family or "").isdigit() or not (model or "").isdigit():
    return None
  family, model = int(family), int(model)
  ranges = {23: (("Zen / Zen+", ((0x00, 0x2F),)), ("Zen 2", ((0x30, 0xAF),))),
            25: (("Zen 3", ((0x00, 0x0F), (0x20, 0x5F))), ("Zen 4", ((0x10, 0x1F), (0x60, 0x7F), (0xA0, 0xAF)))),
            26: (("Zen 5", ((0x00, 0x7F),)),)}
  return next((name for name, spans in ranges.get(family, ()) if any(lo <= model <= hi for lo, hi in spans)), None)


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
