# Router image (the edge site: edge node + Ray) and the demo client's image, CPU only:
# torch 2.13.0 CPU build, this package, the generated gRPC modules. No mamba-ssm: on the CPU the
# model runs its pure-PyTorch SSD path (matmamba/kernels.py). An edge site with a GPU runs the
# router from the cloud image instead (deploy/compose.router-gpu.yml).
#
#   docker-compose build router     (or: docker build -f deploy/router.Dockerfile -t matmamba-router .)
#
# Not built by CI (no Docker engine there): CI validates docker-compose.yml and runs each service's
# command as a local process (tests/test_compose.py).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# torch first, from the CPU index: pip must never resolve a bare torch (it would fetch a CUDA build).
RUN pip install --upgrade pip setuptools wheel \
 && pip install torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY matmamba ./matmamba
COPY proto ./proto
COPY cloud ./cloud
COPY router ./router
COPY edge ./edge
# The held-out Fashion-MNIST sample the demo client (`python -m edge demo`) runs over.
COPY data ./data
# The package in editable-compat mode (as `make setup` does), then the generated gRPC modules.
RUN pip install -e . --config-settings editable_mode=compat \
 && python -m proto.codegen \
 && python -c "import cloud, router, edge; from proto import matmamba_pb2_grpc"

# Checkpoints are mounted at /checkpoints, thresholds files at /thresholds (docker-compose.yml).
EXPOSE 50052 9100
CMD ["python", "-m", "router", "--help"]
