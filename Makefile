# mpp: `make demo` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine's pip takes these from local disk; elsewhere override, e.g. `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.mpp-installed

.PHONY: setup data test lint demo clean

setup: $(STAMP) data

# pip's output goes to a log, so `make demo` shows mpp's own lines; on a failure its tail and the log's path are shown.
SETUP_LOG := $(VENV)/setup.log

$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (torch, mpp and its dependencies; pip output in $(SETUP_LOG))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@{ $(BIN)/python -m pip install --upgrade pip && $(BIN)/python -m pip install $(TORCH_SPEC) && \
	  $(BIN)/python -m pip install -e '.[dev,viz]'; } > $(SETUP_LOG) 2>&1 || \
	  { tail -n 20 $(SETUP_LOG); echo "setup failed: pip's whole output is in $(SETUP_LOG)"; exit 1; }
	@touch $(STAMP)

# Real Fashion-MNIST from Debian's package, only when root on Debian and the files are missing; elsewhere
# mpp downloads it with torchvision at first use.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && [ -f /etc/debian_version ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null || (apt-get update -q >/dev/null && \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null); fi

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check mpp tests benchmarks
	$(BIN)/ruff format --check mpp tests benchmarks

demo: setup
	$(BIN)/mpp pretrain --recipe recipes/fmnist_demo.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
