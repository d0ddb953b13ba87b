# The two commands: `make demo` (set up, make the synthetic data, train and evaluate the demo model)
# and `make test` (set up, run the tests). Both create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# img2dataset pins webdataset 0.2.x and pandas 2.x, which clash with ours: it lives in a venv of its own,
# used by tests/test_img2dataset.py (as a user runs it: a separate tool that writes shards).
I2D := .venv-img2dataset
I2D_STAMP := $(I2D)/.installed-stamp

.PHONY: setup demo test clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

data/synth/eval/colors/train/nshards.txt: | $(STAMP)  # written last: the whole set (incl. the linear-probe split)
	$(BIN)/clipforge prep synthetic --out data/synth --num-samples 20000

demo: $(STAMP) data/synth/eval/colors/train/nshards.txt
	rm -rf runs/demo
	$(BIN)/clipforge train configs/demo.yaml

$(I2D_STAMP):
	test -x $(I2D)/bin/python || $(PYTHON) -m venv $(I2D)
	$(I2D)/bin/pip install img2dataset==1.47.0
	touch $(I2D_STAMP)

# The default run (-m 'not slow', pyproject's addopts) then the slow tests (torch.compile's ~2 minute build).
test: $(STAMP) $(I2D_STAMP)
	$(BIN)/pytest
	$(BIN)/pytest -m slow
