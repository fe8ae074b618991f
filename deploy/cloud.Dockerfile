# Cloud replica image: CUDA, torch, mamba-ssm's Triton kernels, causal-conv1d's CUDA extension,
# and this package (python -m cloud). Also the router's image when the edge site has a GPU
# (deploy/compose.router-gpu.yml).
#
#   docker-compose build cloud      (or: docker build -f deploy/cloud.Dockerfile -t matmamba-cloud .)
#
# Not built by CI (no Docker engine there): CI validates docker-compose.yml and runs each service's
# command as a local process (tests/test_compose.py). The build args pick the CUDA/torch pairing.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# GPUs the causal-conv1d extension is compiled for (A100, H100/H200); add yours, e.g. "8.6" or "8.9".
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG MAX_JOBS=8

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip setuptools wheel

# torch first, from the CUDA index: pip must never resolve a bare torch.
RUN pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX_URL} \
 && pip install triton einops packaging ninja

# mamba-ssm: the Triton SSD kernels need no CUDA build, and --no-deps keeps out its Mamba-3
# dependencies (transformers, tilelang, cutlass; DESIGN.md "Kernels").
RUN MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    pip install --no-build-isolation --no-deps mamba-ssm==2.3.2.post1

# causal-conv1d with its CUDA extension compiled here by nvcc (the devel image has it);
# matmamba/kernels.py uses it when it imports and falls back to a PyTorch conv otherwise.
RUN CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS=${MAX_JOBS} \
    pip install --no-build-isolation --no-deps causal-conv1d==1.7.0 \
 && python -c "import torch, causal_conv1d_cuda"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY matmamba ./matmamba
COPY proto ./proto
COPY cloud ./cloud
COPY router ./router
COPY edge ./edge
# The package in editable-compat mode (as `make setup` does), then the generated gRPC modules.
RUN pip install -e . --config-settings editable_mode=compat \
 && python -m proto.codegen \
 && python -c "import cloud, router, edge; from proto import matmamba_pb2_grpc"

# Checkpoints are mounted at /checkpoints (docker-compose.yml); nothing is downloaded at run time.
EXPOSE 50051 9101
CMD ["python", "-m", "cloud", "--checkpoint", "/checkpoints/matmamba-vision-fmnist", "--host", "0.0.0.0"]
