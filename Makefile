# The two README commands: `make demo` (the whole pipeline on the built-in demo tissue) and
# `make test` (the test suite). Both create .venv and install into it when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo/$(DEMO_SIZE)
DEMO_SIZE ?= medium
DEMO_SEED ?= 0

.PHONY: venv test demo clean-demo

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision first and pinned (see README, Install); a torch you installed yourself is kept
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -r requirements.txt
	$(PY) -c "import models; models.compile_cpu_loops()"   # numba's cache of the CPU loops in models/
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m utils.demo --directory $(DEMO_DIR) --size $(DEMO_SIZE) --seed $(DEMO_SEED)

clean-demo:
	rm -rf demo
