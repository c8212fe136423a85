# wsi-sampler service image. CPU torch by default; for CUDA build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t wsi-sampler:gpu .
# openslide comes from the openslide-bin wheel: no system library needed.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.5.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WSI_HOST=0.0.0.0 \
    WSI_PORT=8000 \
    WSI_SLIDE_ROOTS='["/slides"]' \
    WSI_DATA_DIR=/data \
    WSI_DEMO_SLIDE=false

WORKDIR /app
COPY pyproject.toml README.md ./
COPY wsi_sampler ./wsi_sampler
COPY api ./api
COPY configs ./configs

# The project itself is the one unpinned install: it is this source tree.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir ".[dask,remote]" \
    && useradd --create-home --uid 1000 wsi \
    && mkdir -p /slides /data \
    && chown wsi:wsi /data

USER 1000
VOLUME ["/slides", "/data"]
EXPOSE 8000 8001

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('WSI_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["wsi-sampler"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
