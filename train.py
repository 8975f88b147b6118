"""Train MSP soft prompts on a frozen backbone.

  python train.py --config=configs/attention.py [--config.max_steps=20 --config.workdir=runs/try1]

Re-running with the same workdir resumes from its latest checkpoint.
"""
from absl import app
from ml_collections import config_flags

from msp_jax import cli, trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/attention.py", "Training config file.")


def run():
  summary = trainer.train(_CONFIG.value)
  print(f"{summary['status']} at step {summary['step']}; best {summary['select_metric']} "
        f"{summary['best']} (step {summary['best_step']}); outputs in {summary['workdir']}")


if __name__ == "__main__":
  app.run(cli.main(run))
