"""What the three absl mains share: no stray arguments, quiet library logs, and bad input as a
one-line `error: ...` with exit status 1 instead of a traceback: an `MspError` from the run, and
also what goes wrong while absl parses the flags (an unknown config field, a bad `FILE:ARG`, a
config file that cannot be loaded), which happens before `main` runs. Ctrl-C is one line with
status 130.

  _CONFIG = cli.define_config("config", "configs/attention.py", "Training config file.")
  if __name__ == "__main__":
    cli.run(body)     # body() does the work, reading _CONFIG.value
"""
from __future__ import annotations

import difflib
import re
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_dict, config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from msp_jax import interrupts
from msp_jax.errors import MspError


def run(body: Callable[[], None]) -> None:
  """`app.run` of `body` with flag parsing that fails in one line."""
  app.run(main(body), flags_parser=parse_flags)


def main(body: Callable[[], None]) -> Callable[[list[str]], None]:
  """An absl `main(argv)` that runs `body()`."""
  def run_body(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
      body()
    except MspError as e:
      # What the run wrote is closed. Skip the teardown, where libraries report work they abandoned
      # (Orbax's unfinished reads of a damaged checkpoint) as stray tracebacks after the one line.
      print(f"error: {e}", file=sys.stderr)
      interrupts.exit_now(1)
    except interrupts.Interrupted as e:  # saved and closed: says where, and leaves at once
      print(e, flush=True)
      interrupts.exit_now()
    except KeyboardInterrupt:
      print("interrupted", flush=True)
      sys.exit(interrupts.EXIT_STATUS)
  return run_body


def define_config(name: str, default: str, help_string: str):
  """`config_flags.DEFINE_config_file`. Without `--name=FILE` on the command line it loads the
  default file and applies the `--name.field=...` overrides right here, at import: those errors are
  one line too."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except Exception as e:
    _fail(_parse_error(e, sys.argv, {name: default}))


def parse_flags(argv: list[str]) -> list[str]:
  """`FLAGS(argv)`, exiting with `error: ...` (one line, status 1) where absl or ml_collections would
  print a traceback or a multi-line report. Parsing only reads argv and config files: whatever
  fails here is the user's input."""
  files = lambda: {name: _config_file(name, argv) for name in _config_flags()}
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:
    _fail(_parse_error(e, argv, files()))
  for name, file in files().items():
    try:
      flags.FLAGS[name].value.keys()  # a config file that failed to load raises on first access
    except OSError as e:
      _fail(f"--{name}={file}: cannot load the config file ({_last_line(str(e))})")
  return rest


def _parse_error(e: Exception, argv: list[str], files: dict[str, str]) -> str:
  """The one-line message for an exception raised while parsing flags and loading config files."""
  where = " ".join(f"--{name}={file}" for name, file in files.items()) or "flags"
  if isinstance(e, MspError):  # raised by a config file's get_config (e.g. an unknown FILE:ARG)
    return f"{where}: {e}"
  if isinstance(e, OSError):  # ml_collections defers a failed load to the first override
    return f"{where}: cannot load the config file ({_last_line(str(e))})"
  if isinstance(e, flags.Error):
    return _one_line(str(e))
  if isinstance(e, (AttributeError, KeyError)):  # ml_collections: an override of a field the config lacks
    unknown = _unknown_override(argv, files)
    if unknown:
      return unknown
  return f"{where}: {type(e).__name__}: {_one_line(str(e))}"  # e.g. a config file that raises


def _fail(message: str):
  sys.exit(f"error: {message}")


def _one_line(text: str) -> str:
  """A multi-line report (often a formatted traceback) as its first and last lines."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"


def _last_line(text: str) -> str:
  """The cause at the end of ml_collections' multi-line load report."""
  return text.strip().splitlines()[-1].strip()


def _config_flags() -> list[str]:
  return [name for name in flags.FLAGS if isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser)]


def _config_file(name: str, argv: list[str]) -> str:
  """The `--name=FILE[:ARG]` value in argv, else the flag's default."""
  for i, arg in enumerate(argv):
    if arg.startswith((f"--{name}=", f"-{name}=")):
      return arg.split("=", 1)[1]
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return argv[i + 1]
  return flags.FLAGS[name].default_as_str.strip("'\"")


def _unknown_override(argv: list[str], files: dict[str, str]) -> str | None:
  """`--config.a.b=...` naming a field the config file does not have, with close matches."""
  for name, file in files.items():
    try:
      config = ConfigFileFlagParser(name).parse(file)
    except Exception:  # the file itself is at fault; the caller reports the original error
      return None
    for arg in argv:
      match = re.match(rf"-{{1,2}}(?:no)?{re.escape(name)}\.([^=]+)", arg)
      if not match:
        continue
      node = config
      for depth, key in enumerate(match.group(1).split(".")):
        fields = list(node.keys()) if isinstance(node, (config_dict.ConfigDict, dict)) else []
        if key not in fields:
          path = ".".join(match.group(1).split(".")[:depth + 1])
          close = difflib.get_close_matches(key, fields, n=3)
          hint = f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(sorted(fields))}"
          return f"{arg}: {file} has no field {name}.{path}; {hint}"
        node = node[key]
  return None
