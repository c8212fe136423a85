#!/usr/bin/env bash
# Run HERE (a machine with the package registries) before a GPU run: downloads into .whl/
# the wheels the GPU machine lacks (its python3 already holds torch, torchvision, timm,
# OpenCV, h5py, tifffile, numpy), for its Python 3.12 on x86-64. About 37 MiB; the device
# tool carries .whl/ with the working tree (`carry: [".whl"]`). Versions are the ones
# `make test` installs here.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
for spec in openslide-python==1.4.7 openslide-bin==4.0.1.2 tiffslide==3.0.1 \
            imagecodecs==2026.3.6 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 \
            shapely==2.2.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
            typing-inspection==0.4.5; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
du -sh .whl
