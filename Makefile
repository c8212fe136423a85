# wsi-sampler: `make run` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned here (not in pyproject, which allows torch>=2.3): an unpinned torch pulls
# a multi-GB CUDA build from the internet. We pin 2.14.1 + torchvision 0.29.1, the matching
# pair our machines install from local disk, because timm (the ``timm`` extra: user models
# from timm architectures + safetensors weights, tested in CI) needs torchvision, and
# PyPI's torchvision does not import beside the smaller 2.13.0 CPU build. The torch version
# is read from the Dockerfile's `ARG TORCH_VERSION=` line: one pin for the tests and the image.
TORCH_VERSION := $(shell sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
TORCH_PIN := torch==$(TORCH_VERSION) torchvision==0.29.1
EXTRAS := dev,timm,dask,remote,mil,segment
SLIDES_DIR := data/slides

# Real counterparts whose dependencies clash with ours (the OpenAPI client generator,
# MLServer, KServe), each in its own virtual environment, kept between runs outside the
# checkout (tests skip them, saying so, when absent: `make tools` makes them).
TOOLS_DIR ?= $(HOME)/.cache/wsi-sampler/tools
define TOOL_VENV
$(TOOLS_DIR)/$(1)/.installed-$(3):
	rm -rf $(TOOLS_DIR)/$(1)
	$(PYTHON) -m venv $(TOOLS_DIR)/$(1)
	$(TOOLS_DIR)/$(1)/bin/pip install --quiet --disable-pip-version-check '$(2)==$(3)'
	touch $$@
TOOL_STAMPS += $(TOOLS_DIR)/$(1)/.installed-$(3)
endef
$(eval $(call TOOL_VENV,openapi,openapi-python-client,0.29.1))
$(eval $(call TOOL_VENV,mlserver,mlserver,1.7.1))
$(eval $(call TOOL_VENV,kserve,kserve,0.21.0))
# An S3-compatible server for the s3:// slide tests (moto in server mode).
MOTO := moto[server,s3]
$(eval $(call TOOL_VENV,moto,$(MOTO),5.2.5))

# WSInfer (its reader and inference step run on our WSInfer-layout files). It needs torch:
# its venv sees ours through a .pth file, rewritten on every run (CI clones elsewhere), so
# pip installs only what WSInfer adds (pandas, scikit-image, wsinfer-zoo, ...) and the
# zarr 2 that WSInfer 0.6.1 patches at import (it reads slides with openslide here).
WSINFER_VERSION := 0.6.1
WSINFER_VENV := $(TOOLS_DIR)/wsinfer
$(WSINFER_VENV)/.installed-$(WSINFER_VERSION): | $(STAMP)
	rm -rf $(WSINFER_VENV)
	$(PYTHON) -m venv $(WSINFER_VENV)
	$(MAKE) --no-print-directory wsinfer-link
	$(WSINFER_VENV)/bin/pip install --quiet --disable-pip-version-check \
	    'wsinfer==$(WSINFER_VERSION)' 'zarr<3'
	touch $@
TOOL_STAMPS += $(WSINFER_VENV)/.installed-$(WSINFER_VERSION)
wsinfer-link:
	@$(WSINFER_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
	    | xargs -I{} sh -c '$(PY) -c "import sysconfig; print(sysconfig.get_path(\"purelib\"))" \
	    > {}/wsi-sampler-venv.pth'

# Servers from Debian packages for the remote-slide tests: Orthanc with its DICOMweb and WSI
# plugins (a PACS, and OrthancWSIDicomizer to convert slides into DICOM-WSI) and nginx (HTTP
# Range). Installed when missing and apt-get can run (root); the tests skip, saying so,
# where it cannot.
# Headless Chromium and its driver for the viewer's browser tests.
SYSTEM_PACKAGES := orthanc orthanc-dicomweb orthanc-wsi nginx-light chromium chromium-driver
system-deps:
	@if command -v Orthanc >/dev/null && command -v OrthancWSIDicomizer >/dev/null \
	    && command -v nginx >/dev/null && command -v chromium >/dev/null \
	    && command -v chromedriver >/dev/null \
	    && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q >/dev/null \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	        $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "system-deps: not root or no apt-get; Orthanc/nginx/Chromium tests will skip"; fi

# The viewer's browser files (OpenSeadragon) from npm at the version pinned in
# viewer/package-lock.json, into viewer/node_modules (never committed, never from a CDN).
VIEWER_ASSETS := viewer/node_modules/openseadragon/build/openseadragon/openseadragon.min.js
$(VIEWER_ASSETS): viewer/package.json viewer/package-lock.json
	@if command -v npm >/dev/null; then \
	    npm ci --prefix viewer --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "viewer-assets: npm not found; /viewer answers 503 until OpenSeadragon is installed"; fi
viewer-assets: $(VIEWER_ASSETS)

.PHONY: install test lint format run demo bench fuzz soak clean tools system-deps wsinfer-link \
	docker-test viewer-assets

$(STAMP): pyproject.toml Makefile Dockerfile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

tools: $(TOOL_STAMPS)
	@if [ -x $(WSINFER_VENV)/bin/python ]; then $(MAKE) --no-print-directory wsinfer-link; fi

test: lint tools system-deps viewer-assets
	WSI_TOOLS_DIR=$(TOOLS_DIR) $(PY) -m pytest --durations=20

$(SLIDES_DIR)/demo.svs: | $(STAMP)
	mkdir -p $(SLIDES_DIR)
	$(VENV)/bin/wsi-sampler demo-slide $@

demo: $(SLIDES_DIR)/demo.svs

# The service on 127.0.0.1:8000 with the embedded default: in-process tissue-qc model,
# ./data/slides as slide root (a demo slide is generated there if it is empty).
run: $(STAMP) viewer-assets
	$(VENV)/bin/wsi-sampler serve

# Side-by-side extraction benchmark; generates its slides once into benchmarks/_slides/.
bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS),bench]'
	$(PY) -m benchmarks.extract --results benchmarks/RESULTS.md

# The image built by a real engine (podman, installed from Debian when missing) and
# smoke-tested: every route, uid 1000, volumes, WSI_PORT, HEALTHCHECK, SIGTERM, compose.
# Called by .ci/run after `make test`; says so and exits 0 where no engine can run.
docker-test: $(STAMP)
	bash docker/test/run.sh $(abspath $(PY))

# The fuzz corpus at full size: damaged slides through the library, CLI and API
# (make test runs a 14-per-seed sample of the same corpus).
FUZZ_MUTANTS ?= 150
fuzz: $(STAMP)
	WSI_FUZZ_MUTANTS=$(FUZZ_MUTANTS) $(PY) -m pytest -q tests/test_fuzz.py

# 16 clients against a real server for 2 minutes: throughput, first-byte latency, RSS.
soak: $(STAMP)
	$(PY) -m benchmarks.soak

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache viewer/node_modules
