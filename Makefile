# The two commands: `make demo` (set up, make the synthetic data, train and evaluate the demo model, export it and
# print one zero-shot prediction from the export) and `make test` (set up, run the tests).
# Both create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# img2dataset pins webdataset 0.2.x and pandas 2.x, which clash with ours: it lives in a venv of its own,
# used by tests/test_img2dataset.py (as a user runs it: a separate tool that writes shards).
I2D := .venv-img2dataset
I2D_STAMP := $(I2D)/.installed-stamp
# The demo model is a CLIP-ResNet (a tiny ViT learns colour but not shape in its time budget on two CPU cores), and
# transformers' CLIPModel has no ResNet tower: the demo exports it in open_clip's format and loads it back there.
DEMO_EXPORT := runs/demo/export/open_clip

.PHONY: setup demo test clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

DEMO_PREP := $(BIN)/clipforge prep synthetic --out data/synth --num-samples 20000

data/synth/eval/colors/train/nshards.txt: | $(STAMP)  # written last: the whole set (incl. the linear-probe split)
	$(DEMO_PREP)

# The dense sets, which a data/synth made before them lacks: the same command again resumes the training shards
# (nothing to redo) and rewrites eval/. On a fresh clone the rule above has already written this file.
data/synth/eval/referring/refs_test.json: | data/synth/eval/colors/train/nshards.txt
	$(DEMO_PREP)

demo: $(STAMP) data/synth/eval/colors/train/nshards.txt data/synth/eval/referring/refs_test.json
	rm -rf runs/demo
	$(BIN)/clipforge train configs/demo.yaml
	$(BIN)/clipforge export runs/demo/checkpoints/latest --format open_clip --out $(DEMO_EXPORT)
	$(BIN)/python examples/zero_shot.py $(DEMO_EXPORT) data/synth/eval/shapes

$(I2D_STAMP):
	test -x $(I2D)/bin/python || $(PYTHON) -m venv $(I2D)
	$(I2D)/bin/pip install img2dataset==1.47.0
	touch $(I2D_STAMP)

# The default run (-m 'not slow', pyproject's addopts) then the slow tests (torch.compile's ~2 minute build).
test: $(STAMP) $(I2D_STAMP)
	$(BIN)/pytest
	$(BIN)/pytest -m slow
