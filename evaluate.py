"""Measure synthetic data: the downstream experiment grid, or the data-quality metrics of one file.

  python evaluate.py --config=configs/experiment.py[:smoke]           # the grid -> {workdir}/results.md
  python evaluate.py --config=configs/experiment.py --jsonl=runs/attention/synthetic/msp.jsonl \
      --config.tasks=nlupp/hotels                                     # metrics of one generated file
"""
import json

from absl import flags

from msp_jax import cli, experiment, files

_CONFIG = cli.define_config("config", "configs/experiment.py", "Experiment config file.")
_JSONL = flags.DEFINE_string("jsonl", "", "A generated JSONL to measure (data quality only) instead of the grid.")


def run():
  if _JSONL.value:
    # Strict JSON: a metric with nothing to measure (NaN) prints as null, which every JSON reader takes.
    print(json.dumps(files.finite_or_none(experiment.measure_file(_CONFIG.value, _JSONL.value)), indent=1,
                     allow_nan=False))
  else:
    experiment.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run(run)
