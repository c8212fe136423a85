# wsi-sampler: `make run` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned here (not in pyproject, which allows torch>=2.3) because 2.13.0 is the
# CPU build that installs from local disk on our machines; an unpinned torch pulls a
# multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
SLIDES_DIR := data/slides
OUT_DIR := data/out

.PHONY: install test lint format run demo clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest

$(SLIDES_DIR)/demo.svs: | $(STAMP)
	mkdir -p $(SLIDES_DIR)
	$(VENV)/bin/wsi-sampler demo-slide $@

demo: $(SLIDES_DIR)/demo.svs

run: $(STAMP) demo
	$(VENV)/bin/wsi-sampler info $(SLIDES_DIR)/demo.svs
	$(VENV)/bin/wsi-sampler patches $(SLIDES_DIR)/demo.svs --out $(OUT_DIR)/demo \
		--strategy stratified -n 64 --mpp 0.5 --size 224
	@echo "patches, index.csv, overlay.png and run_metadata.json are in $(OUT_DIR)/demo"

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
