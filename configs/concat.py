"""MSP with the concat mixer on NLU++ hotels (few-shot), SmolLM2-135M-Instruct backbone.

  python train.py --config=configs/concat.py                       # the full run (CPU: hours)
  python train.py --config=configs/concat.py:smoke                 # 4 steps, about a minute
  python train.py --config=configs/concat.py --config.max_steps=20 --config.workdir=runs/try1

See README.md for the dev loss this reaches and the command that measured it.
"""
from configs import common


def get_config(arg=None):
  return common.get_config(arg, mixture="concat")
