"""Synthesise labelled, attribute-controlled data from a trained MSP run (or the in-context baseline).

  python generate.py --config=configs/attention.py --config.workdir=runs/attention
  python generate.py --config=configs/attention.py --config.method=in_context --config.workdir=runs/icl

Writes {workdir}/synthetic/{method}.jsonl (one example per line) atomically; an interrupted run resumes.
"""
from msp_jax import cli, synthesis

_CONFIG = cli.define_config("config", "configs/attention.py", "Run config file (as for train.py).")


def run():
  summary = synthesis.synthesize(_CONFIG.value)
  print(f"wrote {summary['kept']} examples to {summary['output']}")


if __name__ == "__main__":
  cli.run(run)
