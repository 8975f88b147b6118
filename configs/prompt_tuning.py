"""Plain prompt tuning (the paper's baseline): the instruction prompt only, no attribute prompts,
on NLU++ hotels (few-shot) with SmolLM2-135M-Instruct.

  python train.py --config=configs/prompt_tuning.py
  python generate.py --config=configs/prompt_tuning.py --config.workdir=runs/none
"""
from configs import common


def get_config(arg=None):
  return common.get_config(arg, mixture="none")
