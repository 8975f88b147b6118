"""Train MSP soft prompts on a frozen backbone.

  python train.py --config=configs/attention.py [--config.max_steps=20 --config.workdir=runs/try1]

Re-running with the same workdir resumes from its latest checkpoint.
"""

from msp_jax import cli, trainer

_CONFIG = cli.define_config("config", "configs/attention.py", "Training config file.")


def run():
  summary = trainer.train(_CONFIG.value)
  print(f"{summary['status']} at step {summary['step']}; best {summary['select_metric']} "
        f"{summary['best']} (step {summary['best_step']}); outputs in {summary['workdir']}")


if __name__ == "__main__":
  cli.run(run)
