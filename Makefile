# The two commands a user runs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

# torch brings several GB of CUDA wheels: a dropped connection resumes (--resume-retries), and a failed install
# is tried again (pip's cache keeps the wheels that already arrived) before a fresh clone is declared broken.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	for attempt in 1 2 3; do \
	  $(BIN)/python -m pip install --quiet --resume-retries 10 -e ".[dev]" && break; \
	  test $$attempt -lt 3 || exit 1; \
	  echo "pip install failed (attempt $$attempt of 3), retrying in 30 s" >&2; sleep 30; \
	done
	touch $(STAMP)

venv: $(STAMP)
.venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m midtune.demo $(if $(FORCE),--force,)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs/demo
