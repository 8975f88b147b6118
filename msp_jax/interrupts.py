"""Ctrl-C for a training run: the first stops it cleanly after the current step, a second at once.

Python runs signal handlers only between bytecodes of the main thread, so while a jitted step or a
compile runs (seconds to minutes) a handler waits. `StopGuard` therefore has the C-level handler
write each signal to a socket (`signal.set_wakeup_fd`) that a small thread reads: it reacts at
once, even mid-step. Where there is nothing to save (start-up, the first step's compile) and on a
second Ctrl-C it ends the process at once, with status 130: a run is resumable from its latest
checkpoint, as after any kill, and every file it writes is replaced atomically.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading

EXIT_STATUS = 130  # what a shell reports for a process ended by SIGINT (128 + 2)


class Interrupted(KeyboardInterrupt):
  """A run stopped by Ctrl-C after saving; the message says where and how to resume.

  A KeyboardInterrupt, so code between the loop and the main (the experiment grid) stops too."""


def exit_now(status: int = EXIT_STATUS) -> None:
  """Ends the process with `status` (default 130) without Python's teardown, which for jax / XLA / TFDS
  takes 5-9 s on a busy 2-core machine. Only for when everything the run writes is closed: its files are
  replaced atomically, and kernel buffers survive the exit."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


class StopGuard:
  """`with StopGuard() as guard:` ... `guard.graceful = True` once a step is done (there is
  something to save), then `guard.requested` after each step.

  While `graceful` is False the first Ctrl-C ends the process at once. Installed only from the main
  thread; elsewhere it does nothing (Ctrl-C is then a plain KeyboardInterrupt).
  """

  def __init__(self):
    self.graceful = False
    self.requested = False
    self._count = 0
    self._active = threading.current_thread() is threading.main_thread()

  def __enter__(self) -> "StopGuard":
    if not self._active:
      return self
    self._read, self._write = socket.socketpair()
    self._write.setblocking(False)
    # A Python handler must be installed for the C-level one to write to the wakeup socket; the
    # watcher thread does the work.
    self._previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)
    self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
    self._watcher = threading.Thread(target=self._watch, name="ctrl-c", daemon=True)
    self._watcher.start()
    return self

  def __exit__(self, *exc) -> None:
    if not self._active:
      return
    signal.set_wakeup_fd(self._previous_fd)
    signal.signal(signal.SIGINT, self._previous_handler)
    self._write.send(b"\0")  # not a signal number: tells the watcher to end
    self._watcher.join()
    self._read.close()
    self._write.close()

  def _watch(self) -> None:
    while True:
      for signum in self._read.recv(64):
        if signum == 0:
          return
        if signum != signal.SIGINT:
          continue
        self._count += 1
        if self._count == 1 and self.graceful:
          self.requested = True
          print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort at once)",
                file=sys.stderr, flush=True)
        else:
          print("\ninterrupted; re-run the same command to resume from the latest checkpoint",
                file=sys.stderr, flush=True)
          exit_now()
