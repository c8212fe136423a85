#!/usr/bin/env bash
# Test scaffolding for `make docker-test` (not part of the image): a real container engine
# (podman from Debian) set up for these machines, a base image where no registry can be
# reached, and the pinned torch as a local PEP 503 index. Prints `export` lines for the
# caller; exit 3 with one "skip:" line where the engine cannot run (not root, no apt-get).
#
# Facts about these machines (measured; see the Docker issue): crun 1.8 refuses the hybrid
# cgroups, so runc is the runtime; root here cannot raise rlimits, so default ulimits are
# capped; package downloads go through a TLS-inspecting proxy whose CA the host trusts (the
# build sees that CA through a read-only mount, never baked into a layer).
set -euo pipefail
CACHE=${WSI_DOCKER_CACHE:-$HOME/.cache/wsi-sampler/docker}
TORCH_VERSION=$1
PIP=${2:-pip}
mkdir -p "$CACHE"

# podman-compose runs the compose file; the CNI dnsname plugin lets its services find each
# other by name (the API reaches http://worker:8001).
DNSNAME=/usr/lib/cni/dnsname
if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
        || ! command -v debootstrap >/dev/null || ! command -v podman-compose >/dev/null \
        || [ ! -x "$DNSNAME" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "skip: no podman/runc/debootstrap and not root with apt-get to install them" >&2
        exit 3
    fi
    echo "installing podman, runc, debootstrap, podman-compose (Debian packages) ..." >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        podman runc debootstrap uidmap fuse-overlayfs slirp4netns podman-compose \
        golang-github-containernetworking-plugin-dnsname >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
    echo "skip: podman runs rootful here (the machine's rootless setup has no subuids)" >&2
    exit 3
fi

# Our own containers.conf (CONTAINERS_CONF), leaving the system's untouched.
cat > "$CACHE/containers.conf" <<'CONF'
[engine]
runtime = "runc"
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
CONF
export CONTAINERS_CONF="$CACHE/containers.conf"
echo "export CONTAINERS_CONF=$CONTAINERS_CONF"

# The base image the Dockerfile names, when the registry cannot be reached: Debian's own
# Python 3.11 in a minimal bookworm, a venv at /usr/local so `python` and `pip` sit where
# the official image has them.
BASE=docker.io/library/python:3.11-slim
if ! podman image exists "$BASE"; then
    if ! timeout 60 podman pull -q "$BASE" >/dev/null 2>&1; then
        echo "no registry: making a stand-in $BASE with debootstrap (~1.5 min) ..." >&2
        root="$CACHE/rootfs"
        rm -rf "$root"
        debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates \
            bookworm "$root" http://deb.debian.org/debian >/dev/null
        chroot "$root" python3.11 -m venv /usr/local
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -c . | podman import \
            --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["python3"]' - "$BASE" >/dev/null
        rm -rf "$root"
    fi
fi

# The pinned torch (and what it pulls in) from this machine's local wheel folders, as a
# PEP 503 index the build reads through a mount (TORCH_INDEX=file:///torch-index).
index="$CACHE/torch-index-$TORCH_VERSION-v2"
if [ ! -e "$index/.complete" ]; then
    echo "collecting torch==$TORCH_VERSION and its requirements from local wheels ..." >&2
    rm -rf "$index" && mkdir -p "$index/files"
    $PIP download --quiet --only-binary=:all: --python-version 3.11 \
        --dest "$index/files" "torch==$TORCH_VERSION" >/dev/null
    # PEP 503: one folder per normalised project name, each with an index.html of links
    # (older pips, as in the base image, read a file:// index only through those pages)
    for whl in "$index"/files/*; do
        name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
        mkdir -p "$index/$name"
        ln "$whl" "$index/$name/"
    done
    rm -rf "$index/files"
    for project in "$index"/*/; do
        { echo "<!DOCTYPE html><html><body>"
          for whl in "$project"*.whl; do
              echo "<a href=\"$(basename "$whl")\">$(basename "$whl")</a><br>"
          done
          echo "</body></html>"; } > "$project/index.html"
    done
    { echo "<!DOCTYPE html><html><body>"
      for project in "$index"/*/; do
          echo "<a href=\"$(basename "$project")/\">$(basename "$project")</a><br>"
      done
      echo "</body></html>"; } > "$index/index.html"
    touch "$index/.complete"
fi
echo "export WSI_TORCH_INDEX_DIR=$index"
