"""Train MSP soft prompts on a frozen backbone.

  python train.py --config=configs/attention.py [--config.max_steps=20 --config.workdir=runs/try1]

Re-running with the same workdir resumes from its latest checkpoint.
"""
import sys

from absl import app, logging
from ml_collections import config_flags

from msp_jax import trainer
from msp_jax.errors import MspError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/attention.py", "Training config file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  try:
    summary = trainer.train(_CONFIG.value)
  except MspError as e:
    sys.exit(f"error: {e}")
  print(f"{summary['status']} at step {summary['step']}; best {summary['select_metric']} "
        f"{summary['best']} (step {summary['best_step']}); outputs in {summary['workdir']}")


if __name__ == "__main__":
  app.run(main)
