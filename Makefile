# make quickstart   train a quick Multi30k en->de model on the built-in corpus, print its BLEU
# make test         run the test suite (offline)
# make wheel-test   build the wheel, install it into a fresh venv, run every command from an empty folder
# Both create (or reuse) .venv: torch 2.13.0 first (a looser pin can pull a multi-GB CUDA build),
# then this package with its dev extras. Re-running is quick when nothing changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mt-installed
TORCH ?= torch==2.13.0
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install quickstart test wheel-test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

quickstart: install
	$(BIN)/mt-train recipe=multi30k_en_de_quick

test: install
	$(BIN)/python -m pytest -q

wheel-test:
	bash .ci/wheel-test

bench: install
	$(BIN)/mt-bench

clean:
	rm -rf $(VENV) runs *.egg-info build dist
