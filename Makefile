# Two commands for a fresh machine (see README):  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Everything the embedded default writes (Dagster SQLite home, MLflow store, data, checkpoints).
export RLHF_HOME ?= $(CURDIR)/.rlhf

.PHONY: setup run test ui bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first, pinned, so the later resolve never picks another build. Where pip's own
# configuration does not already serve the CPU wheel (plain PyPI serves the CUDA one on Linux):
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
setup: $(BIN)/python
	$(BIN)/pip install "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -e ".[dev,bench]"

run: setup
	$(BIN)/rlhf run

test: setup
	$(BIN)/python -m pytest -q tests

ui:
	$(BIN)/rlhf ui

bench: setup
	$(BIN)/python bench/ppo_vs_trl.py --out bench/results/latest.json

clean:
	rm -rf $(RLHF_HOME)
