# wsi-sampler service image. CPU torch by default (download.pytorch.org's CPU wheels);
# for CUDA, PyPI's own Linux wheel of the pinned torch is the CUDA 13 build:
#   docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t wsi-sampler:gpu .
# openslide comes from the openslide-bin wheel: no system library needed.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The one torch pin: the Makefile reads it from this line, so CI's tests and this image run
# the same torch.
ARG TORCH_VERSION=2.14.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WSI_HOST=0.0.0.0 \
    WSI_PORT=8000 \
    WSI_SLIDE_ROOTS='["/slides"]' \
    WSI_DATA_DIR=/data \
    WSI_DEMO_SLIDE=false \
    WSI_VIEWER_ASSETS=/app/viewer/node_modules/openseadragon/build/openseadragon

WORKDIR /app

# torch first, in its own layer: the largest download, rebuilt only when its pin changes.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY wsi_sampler ./wsi_sampler
COPY api ./api
COPY configs ./configs
COPY viewer/package.json viewer/package-lock.json viewer/fetch_assets.py ./viewer/

# The project itself is the one unpinned install: it is this source tree. No build tools
# are installed (every dependency is a wheel); no pip cache is kept. The viewer's
# OpenSeadragon comes from its npm package at the locked version (integrity checked).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[dask,remote,mil,segment]" \
    && python viewer/fetch_assets.py \
    && useradd --create-home --uid 1000 wsi \
    && mkdir -p /slides /data \
    && chown wsi:wsi /data

USER 1000
# /data must be writable by uid 1000: a named volume is (it starts as the image's /data); a
# bind mount needs a host folder owned by uid 1000 (`mkdir state && chown 1000:1000 state`).
VOLUME ["/slides", "/data"]
EXPOSE 8000 8001

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('WSI_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["wsi-sampler"]
# Host and port come from WSI_HOST / WSI_PORT (0.0.0.0:8000 above), so `-e WSI_PORT=9000`
# moves both the server and the HEALTHCHECK.
CMD ["serve"]
