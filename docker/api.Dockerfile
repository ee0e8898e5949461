# The service without the model: `ichigo api`, `ichigo watch`, `ichigo flower` and
# `ichigo db upgrade` (the compose file picks the command). Only the service dependencies
# (`pip install .`, no extras): the producer never imports torch or transformers, so the image
# stays a few hundred MB, and the build fails if torch sneaks in through a dependency.
# No HEALTHCHECK here: the image serves four roles; each compose service declares its own.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ICHIGO_DATA_DIR=/var/lib/ichigo

# uid/gid 10001, as in the worker image: both write the shared upload volume, and a named
# volume takes the owner of the folder it is first mounted on
RUN groupadd --system --gid 10001 ichigo \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ichigo --create-home ichigo \
    && install -d -o ichigo -g ichigo /data/uploads /data/watch /data/corpora

WORKDIR /src
# dependencies first, from pyproject.toml alone: this layer survives code changes
COPY pyproject.toml ./
COPY docker/install_deps.py docker/
RUN python docker/install_deps.py
COPY README.md ./
COPY ichigo_pipeline ./ichigo_pipeline
COPY ichigo_common ./ichigo_common
COPY producer ./producer
COPY worker ./worker
COPY migrations ./migrations
# checked outside /src so that the installed package is imported, not the source
WORKDIR /var/lib/ichigo
RUN pip install --no-deps /src \
    && rm -rf /src \
    && python -c "import importlib.util as u; assert not u.find_spec('torch'), 'torch in image'" \
    && ichigo api --help >/dev/null && ichigo watch --help >/dev/null \
    && ichigo flower --help >/dev/null && ichigo db upgrade --help >/dev/null

USER 10001:10001
EXPOSE 8000 5555
CMD ["ichigo", "api", "--host", "0.0.0.0", "--port", "8000"]
