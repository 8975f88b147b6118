"""Trained prompts outside Orbax: safetensors and JSON that other tools can read (never pickle).

  python -m msp_jax.export --workdir=runs/support --out=exported/support [--checkpoint=best|latest|STEP]

writes OUT/prompts.safetensors: every trainable array in fp32, named by its path in the prompts
module ("instruction" [P, D], "banks.<set>" [K, N, D] with rows in the vocabulary's order,
"mixer.<name>"), and OUT/prompts.json: the backbone (id, source, fingerprint), the mixer and its
options, the prompt lengths, the attribute vocabulary (set order = the S axis of attribute ids) and
the checkpoint step. Orbax stays the training checkpoint; this is a copy for use elsewhere:

  backbone = load_backbone(info["backbone"])
  model = export.load(OUT, backbone)       # a PromptedModel: model.prefix(batch) gives the run's prefixes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict
from safetensors.numpy import load_file, save_file

from msp_jax import checkpoints as ckpt
from msp_jax import assembly, files, training
from msp_jax.data.ontology import Ontology
from msp_jax.errors import MspError
from msp_jax.mixers import PromptParam
from msp_jax.models.weights import load_backbone
from msp_jax.prompts import SoftPrompts

TENSORS, INFO = "prompts.safetensors", "prompts.json"
FORMAT = "msp-jax prompts 1"


def flat_arrays(prompts: SoftPrompts) -> dict[str, np.ndarray]:
  """{"instruction": ..., "banks.intents": ..., "mixer.query": ...}: the trainable arrays by path."""
  return {".".join(map(str, path)): np.asarray(v.get_value(), np.float32)
          for path, v in nnx.to_flat_state(nnx.state(prompts, PromptParam))}


def restored(workdir: str, which: str = "best"):
  """(PromptedModel with the checkpoint's prompts, its backbone, metadata, step), from the workdir alone:
  the config and vocabulary in its metadata.json, the backbone it names (checked by fingerprint)."""
  meta = ckpt.read_metadata(workdir)
  if meta is None:
    raise ckpt.CheckpointError(f"--workdir={workdir}: no {ckpt.METADATA} there; expected a train.py workdir")
  c = ConfigDict(dict(meta["config"], workdir=workdir))
  backbone = load_backbone(c.model, dtype=c.dtype or None, param_dtype=c.param_dtype or None)
  check_backbone(backbone, meta["backbone_fingerprint"], os.path.join(workdir, ckpt.METADATA))
  prompts = assembly.make_prompts(c, Ontology.from_json(meta["ontology"]), backbone)
  model = training.PromptedModel(backbone.model, prompts, encoder_decoder=backbone.is_encoder_decoder)
  step = assembly.restore_trainable(c, model, which)
  return model, backbone, meta, step


def check_backbone(backbone, fingerprint: str, where: str) -> None:
  now = ckpt.fingerprint(backbone.source)
  if now != fingerprint:
    raise ckpt.CheckpointError(f"{where}: backbone_fingerprint is {fingerprint} but {backbone.source} has {now}; "
                               "load the backbone the prompts were trained on")


def export(workdir: str, out: str, which: str = "best") -> dict:
  """Writes OUT/prompts.safetensors and OUT/prompts.json (each atomically, the JSON last); returns the JSON."""
  model, backbone, meta, step = restored(workdir, which)
  c = meta["config"]
  info = {"format": FORMAT, "workdir": os.path.abspath(workdir), "step": step,
          "backbone": meta["backbone"], "backbone_source": meta["backbone_source"],
          "backbone_fingerprint": meta["backbone_fingerprint"], "mixture": meta["mixture"],
          "mixer_options": {"temperature": c["mixer_temperature"], "hidden": c["bottleneck_size"],
                            "kernel_size": c["cnn_kernel"]},
          "n_tokens": meta["n_tokens"], "attribute_tokens": meta["attribute_tokens"],
          "embedding_dim": int(model.prompts.instruction.shape[-1]),
          "attribute_sets": list(model.prompts.set_names) or list(meta["attributes"]),
          "attributes": meta["attributes"], "ontology": meta["ontology"]}
  os.makedirs(out, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{TENSORS}.", suffix=".tmp")
  os.close(fd)
  try:
    save_file(flat_arrays(model.prompts), tmp, metadata={"format": FORMAT})
    os.chmod(tmp, 0o644)  # mkstemp made it private
    os.replace(tmp, os.path.join(out, TENSORS))
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  files.write_json_atomic(os.path.join(out, INFO), info, sort_keys=True)
  return info


def load(folder: str, backbone) -> training.PromptedModel:
  """The exported prompts in front of `backbone` (which must be the one they were trained on)."""
  path = os.path.join(folder, INFO)
  try:
    info = json.load(open(path))
  except (OSError, json.JSONDecodeError) as e:
    raise ckpt.CheckpointError(f"{path}: cannot read it ({e}); expected the JSON python -m msp_jax.export writes") from None
  check_backbone(backbone, info["backbone_fingerprint"], path)
  d, sizes = info["embedding_dim"], {s: len(names) for s, names in info["attributes"].items()}
  banks = {s: np.zeros((sizes[s], info["attribute_tokens"], d), np.float32) for s in info["attribute_sets"]}
  prompts = SoftPrompts(np.zeros((info["n_tokens"], d), np.float32), banks, info["mixture"], rngs=nnx.Rngs(0),
                        **info["mixer_options"])
  arrays, expected = load_file(os.path.join(folder, TENSORS)), flat_arrays(prompts)
  if {k: v.shape for k, v in arrays.items()} != {k: v.shape for k, v in expected.items()}:
    raise ckpt.CheckpointError(f"{os.path.join(folder, TENSORS)}: arrays {sorted(arrays)} do not fit {path} "
                               f"(expected {sorted(expected)} with their shapes)")
  state = nnx.state(prompts, PromptParam)
  for p, variable in nnx.to_flat_state(state):
    variable.set_value(jnp.asarray(arrays[".".join(map(str, p))]))
  nnx.update(prompts, state)
  return training.PromptedModel(backbone.model, prompts, encoder_decoder=backbone.is_encoder_decoder)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a train.py workdir")
  parser.add_argument("--out", required=True, help="folder for prompts.safetensors and prompts.json")
  parser.add_argument("--checkpoint", default="best", help="best, latest or a step number")
  args = parser.parse_args(argv)
  try:
    info = export(args.workdir, args.out, args.checkpoint)
  except MspError as e:
    sys.exit(f"error: {e}")
  print(f"exported step {info['step']} of {args.workdir} ({info['mixture']}, "
        f"{sum(len(v) for v in info['attributes'].values())} attributes) to {args.out}")


if __name__ == "__main__":
  main()
