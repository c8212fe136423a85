#!/usr/bin/env bash
# `make docker-test`: build the image with a real engine (podman) and smoke-test it.
# Usage: docker/test/run.sh PYTHON  (the project's venv Python: httpx, the demo-slide writer)
# Where the engine cannot run here (not root, no apt-get), it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$1
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
CACHE=${WSI_DOCKER_CACHE:-$HOME/.cache/wsi-sampler/docker}

set +e
setup=$(bash docker/test/engine.sh "$TORCH_VERSION" "$PY -m pip")
rc=$?
set -e
if [ "$rc" = 3 ]; then echo "docker-test: skipped (see the line above)"; exit 0; fi
[ "$rc" = 0 ] || exit "$rc"
eval "$setup"

# The build as a user runs it, plus this machine's scaffolding, all as read-only mounts that
# never enter a layer: the host's CA bundle (a TLS-inspecting proxy signs package
# downloads here) over the base image's own bundle, for pip (through a pip.conf) and for
# the npm download of the viewer's files; the machine's local package indexes; and the
# pinned torch's wheels as TORCH_INDEX.
cat > "$CACHE/pip.conf" <<CONF
[global]
cert = /etc/ssl/certs/ca-certificates.crt
CONF
mounts=(-v "$CACHE/pip.conf:/etc/pip.conf:ro"
        -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro
        -v "$WSI_TORCH_INDEX_DIR:/torch-index:ro")
extra=""
for index in /opt/pypi /opt/pypi-more; do
    if [ -d "$index/simple" ]; then
        mounts+=(-v "$index:$index:ro")
        extra="$extra file://$index/simple"
    fi
done
[ -z "$extra" ] || echo "extra-index-url =$extra" >> "$CACHE/pip.conf"

store=$(podman info --format '{{.Store.GraphRoot}}')
echo "disk: $(df -h --output=avail "$store" | tail -1 | tr -d ' ') free for images in $store" \
    "(an image is ~6.5 GB; unchanged layers are reused)"
previous=$(podman image inspect --format '{{.Id}}' wsi-sampler:latest 2>/dev/null || true)
start=$(date +%s)
podman build --format docker --layers -t wsi-sampler:latest \
    --build-arg TORCH_INDEX=file:///torch-index "${mounts[@]}" . >"$CACHE/build.log" 2>&1 \
    || { tail -40 "$CACHE/build.log"; echo "docker-test: build failed"; exit 1; }
echo "measured: build $(( $(date +%s) - start )) s (cached layers reused when unchanged)"
# The image this build replaced is left untagged (6.5 GB each, builds add up and fill the
# disk); only that one is removed, never other images or the layer cache.
current=$(podman image inspect --format '{{.Id}}' wsi-sampler:latest)
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    podman rmi "$previous" >/dev/null 2>&1 \
        && echo "removed the image this build replaced (${previous:0:12})" \
        || echo "kept the image this build replaced (${previous:0:12}): still in use"
fi
# The engine leaves empty mount points where the mounts were (a 0-byte file, an empty
# folder); nothing of what was mounted may be in the image, and its CA bundle must be the
# base image's own, not the host's.
check='for p in /etc/pip.conf /torch-index /opt/pypi /opt/pypi-more; do
    if [ -f "$p" ] && [ -s "$p" ]; then echo "$p"; fi
    if [ -d "$p" ] && [ -n "$(ls -A "$p")" ]; then echo "$p"; fi
done'
baked=$(podman run --rm --no-healthcheck --entrypoint sh wsi-sampler:latest -c "$check")
if [ -n "$baked" ]; then echo "docker-test: baked into the image: $baked"; exit 1; fi
bundle=/etc/ssl/certs/ca-certificates.crt
ours=$(podman run --rm --no-healthcheck --entrypoint sha256sum wsi-sampler:latest $bundle)
base=$(podman run --rm --no-healthcheck --entrypoint sha256sum python:3.11-slim $bundle)
if [ "$ours" != "$base" ]; then echo "docker-test: the host's CA bundle is in the image"; exit 1; fi
echo "ok: no build scaffolding (CA bundle, pip.conf, indexes) left in the image"
"$PY" docker/test/smoke.py
