# The API, the folder watcher, Flower and migrations: the service without the model.
# `pip install .` takes only the service dependencies (no torch, no transformers): the
# producer never imports them, so this image stays a few hundred MB.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ICHIGO_DATA_DIR=/var/lib/ichigo

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ichigo_pipeline ./ichigo_pipeline
COPY ichigo_common ./ichigo_common
COPY producer ./producer
COPY worker ./worker
COPY migrations ./migrations
RUN pip install . \
    && python -c "import producer.app, producer.watch, producer.monitor" \
    && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch in the API image'" \
    && useradd --system --uid 10001 --home-dir /var/lib/ichigo --create-home ichigo

USER ichigo
WORKDIR /var/lib/ichigo
EXPOSE 8000 5555
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz?workers=false', timeout=4).status == 200 else 1)" || exit 1
CMD ["ichigo", "api", "--host", "0.0.0.0", "--port", "8000"]
