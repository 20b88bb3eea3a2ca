# Set-up and the two jobs. `make run` and `make test` work on a fresh clone with nothing installed.
# TORCH_SPEC picks the torch build installed first (bring your own CUDA build: TORCH_SPEC=torch==2.13.0+cu128
# with PIP_EXTRA_INDEX_URL, or TORCH_SPEC= to keep whatever the venv has).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup run test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

run: setup
	$(BIN)/attn-tune tune --preset quick --out tuned.json

test: setup
	$(BIN)/python -m pytest -q -rs --durations=25

# Development: every test but those marked slow (pip installs, subprocesses, training, torch.compile); `make test` runs all.
test-fast: setup
	$(BIN)/python -m pytest -q -rs -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
