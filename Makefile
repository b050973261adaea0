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

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev,viz]'
	touch $(STAMP)

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
