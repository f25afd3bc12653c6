# make data  : fetch MNIST, BSDS500 and 2D Sprites into DATA_DIR once (then no network is needed)
# make run   : install into .venv and run every question at its defaults (CPU or GPU)
# make test  : install into .venv and run the test suite (synthetic data, a few minutes on 2 CPUs)
# make verify: recompute every committed number from the committed weights (exit 1 if one
#              differs, 2 if data or weights are missing); writes only outputs/*/eval/
# make bench : images/s of each training step beside the machine's matrix-multiply GFLOP/s
# make run DATA_DIR=/path/to/data  passes a data folder through to every script.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
DATA_DIR ?= ./data
DEVICE  ?= auto

.PHONY: run test install data verify bench q1 q2 q3toy q3mnistm clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

run: q1 q2 q3toy q3mnistm

data: install
	$(PY) q3_mnistm_dann.py --data-dir $(DATA_DIR) --download-only
	$(PY) q2_cyclevae.py --data-dir $(DATA_DIR) --download-only

verify: install
	$(PY) common.py --data-dir $(DATA_DIR) --device $(DEVICE)

bench: install
	$(PY) benchmarks/bench.py

q1: install
	$(PY) q1_vae.py --data-dir $(DATA_DIR) --device $(DEVICE)

q2: install
	$(PY) q2_cyclevae.py --data-dir $(DATA_DIR) --device $(DEVICE)

q3mnistm: install
	$(PY) q3_mnistm_dann.py --data-dir $(DATA_DIR) --device $(DEVICE) --svm-retrain

q3toy: install
	$(PY) q3_toy_dann.py --lambda 6 --device $(DEVICE)

test: install
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
