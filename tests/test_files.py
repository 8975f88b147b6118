"""Safe files: atomic writes that concurrent writers cannot tear, strict JSON metrics, one process
per workdir (the lock dies with its holder)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from msp_jax import files, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_loads(line):
  def refuse(name):
    raise ValueError(f"not JSON: {name}")
  return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("write,read", [
    (files.write_json_atomic, lambda text: json.loads(text)),
    (lambda path, value: files.write_jsonl_atomic(path, [value, value]),
     lambda text: [json.loads(l) for l in text.splitlines()][0]),
])
def test_concurrent_atomic_writes_never_tear_or_crash(write, read, tmp_path):
  """Writers of one path each get their own temporary file: every write lands whole, none fails."""
  path = str(tmp_path / "out.json")
  values = [{"writer": w, "payload": "x" * 20000} for w in range(4)]
  errors = []

  def writer(value):
    try:
      for _ in range(150):
        write(path, value)
    except Exception as e:  # noqa: BLE001 - the test reports any failure of a writer
      errors.append(repr(e))

  threads = [threading.Thread(target=writer, args=(v,)) for v in values]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors[:3]
  assert read(open(path).read()) in values
  assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left behind
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # the mode a plain open() gives


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
  path = str(tmp_path / "metadata.json")
  files.write_json_atomic(path, {"step": 1})
  with pytest.raises(TypeError):
    files.write_json_atomic(path, {"step": 2, "bad": object()})
  assert os.listdir(tmp_path) == ["metadata.json"]
  with pytest.raises(UnicodeEncodeError):
    files.write_text_atomic(path, "half \ud800 written")
  assert json.load(open(path)) == {"step": 1}
  assert os.listdir(tmp_path) == ["metadata.json"]


def test_metrics_lines_are_strict_json(tmp_path):
  log = trainer.RunLog(str(tmp_path))
  log.write(1, {"loss": float("nan"), "dev_perplexity": float("inf"), "lr": 0.5})
  log.close()
  lines = [strict_loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines == [{"step": 1, "loss": None, "dev_perplexity": None, "lr": 0.5}]


def test_resumed_log_drops_what_was_logged_after_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  kept = [{"step": 0, "dev_loss": 3.0}, {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}, {"step": 2, "dev_loss": 2.9}]
  after = [{"step": 3, "loss": 1.5}, {"step": 4, "loss": 1.0}]
  path.write_text("".join(json.dumps(r) + "\n" for r in kept + after) + '{"step": 5, "lo')  # torn by a kill
  log = trainer.RunLog(str(tmp_path), first_step=3)  # resumed from the checkpoint at step 2
  log.write(3, {"loss": 1.25})
  log.close()
  assert [strict_loads(l) for l in open(path)] == kept + [{"step": 3, "loss": 1.25}]


HOLD = """
import sys, time
from msp_jax import files
with files.WorkdirLock(sys.argv[1]):
  print("holding", flush=True)
  time.sleep(600)
"""


def test_workdir_lock_names_its_holder_and_dies_with_it(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", HOLD, workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(files.WorkdirBusy) as busy:
      with files.WorkdirLock(workdir):
        pass
    message = str(busy.value)
    assert message.startswith(f"{workdir} is in use by pid {holder.pid} on host {socket.gethostname()} (started ")
    assert message.endswith(" UTC)")
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with files.WorkdirLock(workdir):  # the kernel released the dead holder's lock
    assert json.load(open(os.path.join(workdir, files.LOCK)))["pid"] == os.getpid()


def test_lock_without_create_leaves_a_missing_workdir_missing(tmp_path):
  workdir = str(tmp_path / "never")
  with files.WorkdirLock(workdir, create=False):
    pass
  assert not os.path.exists(workdir)
