"""Files a run writes, written safely: atomic replacement, strict JSON lines, one writer per workdir.

Atomic: the text goes to a uniquely named temporary file beside the target (so two writers never
share one), is fsynced, and `os.replace`s the target; the folder is fsynced after. A reader, or a
crash at any moment, sees the old file or the new one, never a torn mix.

One writer per workdir: `WorkdirLock` holds an exclusive `flock` on `{workdir}/.lock`. The kernel
drops the lock when the process exits or dies, so a killed run never leaves a stale lock; the
file's text (pid, host, start time) only names the holder for the error message.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import socket
import tempfile
import time
from typing import Any, Iterable

from msp_jax.errors import MspError

LOCK = ".lock"

# mkstemp creates 0600 files; a replaced file should get the mode a plain open() would give it.
# os.umask can only be read by setting it, so read it once, at import, before any threads start.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class WorkdirBusy(MspError):
  """The workdir is held by another running process."""


def write_text_atomic(path: str, text: str) -> None:
  """Replaces `path` with `text` (UTF-8) in one step, creating its folder if needed."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  _fsync_folder(folder)


def write_json_atomic(path: str, value: Any, *, sort_keys: bool = False) -> None:
  """Replaces `path` with `value` as indented JSON."""
  write_text_atomic(path, json.dumps(value, indent=1, sort_keys=sort_keys) + "\n")


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
  """Replaces `path` with one JSON object per line."""
  write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def finite_or_none(value: Any) -> Any:
  """`value` with every NaN / infinite float (in dicts and lists too) replaced by None."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_none(v) for v in value]
  return value


def strict_json(value: Any) -> str:
  """One line of standard JSON: NaN and infinities (which JSON has no words for) become null."""
  return json.dumps(finite_or_none(value), allow_nan=False)


def _fsync_folder(folder: str) -> None:
  """Makes a rename in `folder` durable; some filesystems cannot fsync a folder, which is fine."""
  try:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def locked(folder: str):
  """An exclusive `flock` on the folder itself while the block runs, waiting for any other holder: for a
  read-modify-write of a file there that several processes may update (a file replaced atomically cannot
  carry the lock itself: each replacement is a new inode)."""
  fd = os.open(folder, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the flock


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for this process, or raises `WorkdirBusy` at
  once, having written nothing, if another process holds it.

  A missing workdir is created, unless `create` is False: then nothing is created and nothing is
  locked (a caller that fails on a missing workdir anyway has nothing there to protect).
  """

  def __init__(self, workdir: str, *, create: bool = True):
    self.workdir, self.create, self.fd = workdir, create, None

  def __enter__(self) -> "WorkdirLock":
    if not os.path.isdir(self.workdir):
      if not self.create:
        return self
      os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(os.path.join(self.workdir, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd)
      os.close(fd)
      raise WorkdirBusy(f"{self.workdir} is in use by {holder}") from None
    except BaseException:
      os.close(fd)
      raise
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode(), 0)
    self.fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self.fd is not None:
      os.close(self.fd)  # closing the last descriptor releases the flock
      self.fd = None


def _holder(fd: int) -> str:
  """Who holds the lock, from the lock file's text; the holder writes it just after locking, so
  a reader that comes in between waits a moment for it."""
  for _ in range(20):
    try:
      info = json.loads(os.pread(fd, 4096, 0))
      return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
    except (ValueError, KeyError, TypeError):
      time.sleep(0.05)
  return "another process"
