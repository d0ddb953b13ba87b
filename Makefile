# The two commands: `make demo` (set up, make the synthetic data, train and evaluate the demo model)
# and `make test` (set up, run the tests). Both create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

data/synth/train/sizes.json: | $(STAMP)
	$(BIN)/clipforge prep synthetic --out data/synth --num-samples 20000

demo: $(STAMP) data/synth/train/sizes.json
	rm -rf runs/demo
	$(BIN)/clipforge train configs/demo.yaml

test: $(STAMP)
	$(BIN)/pytest
