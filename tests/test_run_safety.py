"""`train.py` / `generate.py` keep a workdir sound: one process per workdir, Ctrl-C stops with a
checkpoint, and a resumed run logs every step once (metrics.jsonl and TensorBoard)."""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

from msp_jax import files
from test_train import ROOT, run_train, tiny_flags

INTERRUPTED = re.compile(r"interrupted at step (\d+); checkpoint saved in (.+); re-run the same command to resume")


def wait_for(condition, proc, timeout=600):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.02)


def logged_steps(workdir, key):
  path = os.path.join(workdir, "metrics.jsonl")
  return [json.loads(l)["step"] for l in open(path) if key in json.loads(l)] if os.path.exists(path) else []


def lock_holder(workdir):
  try:
    return json.load(open(os.path.join(workdir, files.LOCK)))["pid"]
  except (OSError, ValueError, KeyError):
    return None


def checkpoint_steps(workdir):
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def test_second_run_on_a_workdir_is_refused_at_once(tiny_model_dir, tmp_path):
  workdir = str(tmp_path / "run")
  first = run_train(tiny_flags(tiny_model_dir, workdir, max_steps=6, eval_every=3))
  wait_for(lambda: lock_holder(workdir) == first.pid, first)
  start = time.time()
  second = run_train(tiny_flags(tiny_model_dir, workdir, max_steps=6, eval_every=3))
  out, _ = second.communicate(timeout=300)
  seconds = time.time() - start
  assert second.returncode == 1, out[-3000:]
  assert "Traceback" not in out
  last = out.strip().splitlines()[-1]
  assert re.fullmatch(rf"error: {re.escape(workdir)} is in use by pid {first.pid} on host \S+ \(started .+ UTC\)", last), last
  print(f"second train.py refused in {seconds:.1f} s")
  assert "loading backbone" not in out  # refused before any work: its time is the imports (tens of s on a busy CPU)
  assert seconds < 240
  assert first.poll() is None, "the refused run must not have ended the first"
  out, _ = first.communicate(timeout=600)
  assert first.returncode == 0, out[-3000:]
  assert logged_steps(workdir, "loss") == list(range(1, 7))  # no interleaved second writer
  leftovers = [os.path.join(d, f) for d, dirs, fs in os.walk(workdir) for f in dirs + fs if "tmp" in f]
  assert not leftovers


def test_generate_on_a_workdir_in_use_is_refused_and_writes_nothing(tiny_model_dir, tmp_path):
  workdir = str(tmp_path / "icl")
  os.makedirs(workdir)
  with files.WorkdirLock(workdir):
    proc = subprocess.Popen([sys.executable, "generate.py", "--config=configs/pooling.py", f"--config.model={tiny_model_dir}",
                             f"--config.workdir={workdir}", "--config.method=in_context", "--config.max_seeds=2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
  assert out.strip().splitlines()[-1].startswith(f"error: {workdir} is in use by pid {os.getpid()} on host ")
  assert os.listdir(workdir) == [files.LOCK]


def test_ctrl_c_saves_the_step_and_the_same_command_resumes(tiny_model_dir, tmp_path):
  workdir = str(tmp_path / "run")
  # One bucket: the step in flight at Ctrl-C never compiles a new shape (that would be waited for).
  flags = tiny_flags(tiny_model_dir, workdir, max_steps=40, eval_every=1000, checkpoint_every=1000, buckets="(256,)")
  proc = run_train(flags)
  wait_for(lambda: logged_steps(workdir, "loss"), proc)
  sent = time.time()
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  seconds = time.time() - sent
  assert proc.returncode == 130, out[-3000:]
  assert "Traceback" not in out
  match = INTERRUPTED.fullmatch(out.strip().splitlines()[-1])
  assert match and match.group(2) == workdir, out[-3000:]
  step = int(match.group(1))
  print(f"SIGINT at step {step}: exit 130 after {seconds:.1f} s")
  assert seconds < 15
  assert 1 <= step < 40 and checkpoint_steps(workdir) == [step]
  assert logged_steps(workdir, "loss") == list(range(1, step + 1))

  proc = run_train(flags)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert f"resumed {workdir} at step {step}" in out
  assert logged_steps(workdir, "loss") == list(range(1, 41))


BLOCKED = """
import time
from msp_jax import interrupts
with interrupts.StopGuard() as guard:
  guard.graceful = True
  print("in a step", flush=True)
  time.sleep(60)  # the main thread busy in one long call, as in a jitted step or a compile
print("the step ended", flush=True)
"""


def test_second_ctrl_c_aborts_a_blocked_step_at_once():
  proc = subprocess.Popen([sys.executable, "-c", BLOCKED], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "in a step"
  proc.send_signal(signal.SIGINT)
  assert "stopping after this step" in proc.stderr.readline() + proc.stderr.readline()
  sent = time.time()
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 130 and time.time() - sent < 5, (out, err)
  assert "the step ended" not in out and "Traceback" not in err


def read_events(path):
  """The Event protos of one TensorBoard file (TFRecord framing: length, CRC, data, CRC)."""
  from tensorboardX.proto.event_pb2 import Event
  data, out, at = open(path, "rb").read(), [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    out.append(Event.FromString(data[at + 12:at + 12 + length]))
    at += 12 + length + 4
  return out


def tensorboard_steps(workdir, tag):
  """The steps of `tag` TensorBoard shows: files read in order of their first event, and a
  SessionLog START at step s hiding earlier events at steps >= s (what TensorBoard does on restart)."""
  folder = os.path.join(workdir, "tensorboard")
  event_files = [read_events(os.path.join(folder, f)) for f in os.listdir(folder)]
  event_files = sorted((es for es in event_files if es), key=lambda es: es[0].wall_time)
  steps = []
  for event in (e for events in event_files for e in events):
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      steps = [s for s in steps if s < event.step]
    steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def test_killed_and_resumed_run_logs_each_step_once(tiny_model_dir, tmp_path):
  workdir = str(tmp_path / "run")
  # a constant rate: the run may then be extended (2 -> 12 steps) under the same training settings
  proc = run_train(tiny_flags(tiny_model_dir, workdir, max_steps=2, eval_every=1000, decay="constant"))
  assert proc.wait(timeout=600) == 0
  flags = tiny_flags(tiny_model_dir, workdir, max_steps=12, eval_every=1000, checkpoint_every=1000, decay="constant")
  proc = run_train(flags)  # resumes at 2 and saves nothing before 12: killed, its steps 3.. are lost
  wait_for(lambda: max(logged_steps(workdir, "loss")) >= 5, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(checkpoint_steps(workdir)) == 2, "killed after the next checkpoint: the test needs it before"
  proc = run_train(flags)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0 and f"resumed {workdir} at step 2" in out, out[-3000:]
  assert logged_steps(workdir, "loss") == list(range(1, 13))
  assert logged_steps(workdir, "dev_loss") == [0, 2, 12]
  assert tensorboard_steps(workdir, "loss") == list(range(1, 13))
  assert tensorboard_steps(workdir, "dev_loss") == [0, 2, 12]
