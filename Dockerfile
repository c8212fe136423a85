# wsi-sampler: CPU image. openslide comes from the openslide-bin wheel (no system library).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY wsi_sampler ./wsi_sampler
COPY api ./api
COPY configs ./configs

RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch>=2.3" \
    && pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 wsi

USER wsi
VOLUME ["/slides", "/data"]
ENTRYPOINT ["wsi-sampler"]
CMD ["--help"]
