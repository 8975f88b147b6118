"""Synthesise labelled, attribute-controlled data from a trained MSP run (or the in-context baseline).

  python generate.py --config=configs/attention.py --config.workdir=runs/attention
  python generate.py --config=configs/attention.py --config.method=in_context --config.workdir=runs/icl

Writes {workdir}/synthetic/{method}.jsonl (one example per line) atomically; an interrupted run resumes.
"""
import sys

from absl import app, logging
from ml_collections import config_flags

from msp_jax import synthesis
from msp_jax.errors import MspError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/attention.py", "Run config file (as for train.py).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    summary = synthesis.synthesize(_CONFIG.value)
  except MspError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {summary['kept']} examples to {summary['output']}")


if __name__ == "__main__":
  app.run(main)
