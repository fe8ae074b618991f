# make setup  -> .venv with torch (CPU), mamba-ssm, causal-conv1d, this package (editable), generated protos
# make test   -> ruff + the CPU test suite
# make demo   -> the main job on the embedded default (see README)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# Build mamba-ssm and causal-conv1d without their CUDA extensions: the Triton kernels
# need none, and the CPU path is pure PyTorch (see matmamba/kernels.py).
NO_CUDA_BUILD := MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
	CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE

.PHONY: setup test demo proto lint data clean

setup: $(STAMP) proto

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q triton einops packaging ninja
	$(NO_CUDA_BUILD) $(BIN)/pip install -q --no-build-isolation --no-deps mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

proto: $(STAMP)
	$(BIN)/python -m proto.codegen

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m router.demo

# Training data (not needed by test or demo), from Debian packages: Fashion-MNIST (read where the
# package puts it, /usr/share/datasets/fashion-mnist) and Jane Austen's novels (prepared under .data/prose).
data: setup
	apt-get install -y dataset-fashion-mnist
	$(BIN)/python -m matmamba.data.prose --prepare --download

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache proto/*_pb2*.py proto/*_pb2.pyi
