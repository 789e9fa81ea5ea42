# User-code image of the rlhf pipeline: a Dagster gRPC code server (port 4000) that the
# webserver / daemon of a production Dagster deployment connect to.
#
# CPU (default):  docker build -t rlhf-pipeline .
# CUDA:           docker build -t rlhf-pipeline:cuda \
#                   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
# The CPU wheel index keeps the default image free of multi-GB CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pyproject extras: postgres (the production profile's storage); docker-compose.yml adds docker
# (DockerRunLauncher), a Kubernetes deployment k8s (PipesK8sClient).
ARG EXTRAS=postgres
# The code version recorded on every MLflow run: the image has no git checkout to ask
# (`--build-arg RLHF_CODE_VERSION=$(git rev-parse --short=12 HEAD)`); empty = the package version.
ARG RLHF_CODE_VERSION=""

# g++: DeepSpeed JIT-compiles its shared-memory collective op on first init on a CPU.
# CUDA base images carry no Python; python:* images already do.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && if ! command -v python3 >/dev/null 2>&1; then \
         DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip; \
       fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RLHF_HOME=/var/lib/rlhf \
    DAGSTER_HOME=/var/lib/rlhf/dagster_home \
    RLHF_CODE_VERSION=${RLHF_CODE_VERSION}

# The sources are only the build input: the project runs from site-packages (configs as
# package data), so /src is removed once installed.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipelines ./pipelines
COPY assets ./assets
COPY ops ./ops
COPY resources ./resources
COPY ppo_core ./ppo_core
COPY configs ./configs

# Same order as the Makefile: torch first (pinned), then the project, so pip never swaps torch.
RUN pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-cache-dir ".[${EXTRAS}]" \
    && mkdir -p "${DAGSTER_HOME}" \
    && cd / && rm -rf /src

# A workspace without paths (python_module), for `dagster dev -w` inside the image.
WORKDIR /opt/dagster
COPY workspace.yaml ./workspace.yaml

EXPOSE 4000
CMD ["dagster", "api", "grpc", "-m", "pipelines.definitions", "-h", "0.0.0.0", "-p", "4000"]
