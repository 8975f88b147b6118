"""What the three absl mains share: no stray arguments, quiet library logs, and an `MspError` as a
one-line `error: ...` with exit status 1 instead of a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, logging

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
  return run
