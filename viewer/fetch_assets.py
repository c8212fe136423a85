"""Install the viewer's npm packages from package-lock.json without node (the Docker image).

Every package the lock file lists is downloaded from the npm registry at its locked
version, checked against the lock file's ``integrity`` (SRI sha512) and unpacked into
``node_modules/<name>``, as ``npm ci`` would for packages with no install scripts (the only
kind the viewer uses). Standard library only. ``make viewer-assets`` runs ``npm ci`` itself.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGISTRY = "https://registry.npmjs.org"


def install(name: str, entry: dict[str, str], dest: Path) -> None:
    version, integrity = entry["version"], entry["integrity"]
    url = entry.get("resolved") or f"{REGISTRY}/{name}/-/{name.split('/')[-1]}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=120) as resp:  # noqa: S310 - https registry
        data = resp.read()
    algorithm, _, want = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if got != want:
        raise SystemExit(f"{name}@{version}: integrity mismatch ({algorithm})")
    target = dest / name
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts[1:]  # npm tarballs hold one top folder
            if not parts or not (member.isfile() or member.isdir()):
                continue
            out = target.joinpath(*parts)
            if not out.resolve().is_relative_to(target.resolve()):
                raise SystemExit(f"{name}: unsafe path {member.name!r} in its tarball")
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            extracted = tar.extractfile(member)
            assert extracted is not None
            out.write_bytes(extracted.read())
    print(f"{name}@{version} -> {target}")  # noqa: T201 - a build step reports what it did


def main() -> int:
    lock = json.loads((HERE / "package-lock.json").read_text())
    for key, entry in lock["packages"].items():
        if key.startswith("node_modules/"):
            install(key.removeprefix("node_modules/"), entry, HERE / "node_modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
