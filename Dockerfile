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
    DAGSTER_HOME=/var/lib/rlhf/dagster_home

WORKDIR /app
COPY pyproject.toml README.md workspace.yaml ./
COPY pipelines ./pipelines
COPY assets ./assets
COPY ops ./ops
COPY ppo_core ./ppo_core

# Same order as the Makefile: torch first (pinned), then the project, so pip never swaps torch.
RUN pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-cache-dir . \
    && mkdir -p "${DAGSTER_HOME}"

EXPOSE 4000
CMD ["dagster", "api", "grpc", "-m", "pipelines.definitions", "-h", "0.0.0.0", "-p", "4000"]
