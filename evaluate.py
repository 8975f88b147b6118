"""Measure synthetic data: the downstream experiment grid, or the data-quality metrics of one file.

  python evaluate.py --config=configs/experiment.py[:smoke]           # the grid -> {workdir}/results.md
  python evaluate.py --config=configs/experiment.py --jsonl=runs/attention/synthetic/msp.jsonl \
      --config.tasks=nlupp/hotels                                     # metrics of one generated file
"""
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from msp_jax import experiment
from msp_jax.errors import MspError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/experiment.py", "Experiment config file.")
_JSONL = flags.DEFINE_string("jsonl", "", "A generated JSONL to measure (data quality only) instead of the grid.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    if _JSONL.value:
      print(json.dumps(experiment.measure_file(_CONFIG.value, _JSONL.value), indent=1))
    else:
      experiment.run(_CONFIG.value)
  except MspError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
