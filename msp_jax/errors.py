"""Errors a user can act on. Each message is one line naming the file, field and value at fault
and what would be valid; mains print it without a traceback and exit non-zero."""


class MspError(Exception):
  """Base class of errors caused by bad input (files, names, settings), not by bugs."""


class BackboneError(MspError, ValueError):
  """A checkpoint, GGUF file or model name that cannot be loaded as a backbone."""
