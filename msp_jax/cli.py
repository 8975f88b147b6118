"""What the three absl mains share: no stray arguments, quiet library logs, an `MspError` as a
one-line `error: ...` with exit status 1 instead of a traceback, and Ctrl-C as one line with
status 130."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, logging

from msp_jax import interrupts
from msp_jax.errors import MspError


def main(body: Callable[[], None]) -> Callable[[list[str]], None]:
  """An absl `main(argv)` that runs `body()`."""
  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
      body()
    except MspError as e:
      sys.exit(f"error: {e}")
    except interrupts.Interrupted as e:  # saved and closed: says where, and leaves at once
      print(e, flush=True)
      interrupts.exit_now()
    except KeyboardInterrupt:
      print("interrupted", flush=True)
      sys.exit(interrupts.EXIT_STATUS)
  return run
