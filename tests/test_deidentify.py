"""De-identified mode and copies: a slide whose file name, description, label and macro
carry a canary string; the canary must appear in no answer, file or INFO log line, and the
label's pixels in no copy (the pyramid's tiles stay byte for byte)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from _servers import folder_settings, serve, wait_for_job

from api.app import create_app
from wsi_sampler import open_slide
from wsi_sampler.deidentify import deidentify_file, load_pseudonyms, sanitise_aperio
from wsi_sampler.demo import DemoSlideSpec, write_demo_slide
from wsi_sampler.errors import InvalidRequestError, UnsupportedFormatError

CANARY = b"CANARY4242"
CLI = [sys.executable, "-c", "from wsi_sampler.cli import main; main()"]
HEAD = "Aperio Image Library v12.0.15 \n"


@pytest.fixture(scope="module")
def canary_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """DOE_JOHN_CANARY4242.svs: the canary in its name, its description (Filename, User),
    its Artist tag, and as the label's and macro's descriptions; the label's raw pixels."""
    folder = tmp_path_factory.mktemp("phi")
    path = folder / "DOE_JOHN_CANARY4242.svs"
    write_demo_slide(path, DemoSlideSpec(width=4096, height=3072, mpp=0.25, seed=5))
    data = bytearray(path.read_bytes())
    at = data.index(b"Filename = wsi-sampler-demo-5")
    data[at: at + 29] = b"Filename = DOE-CANARY4242-5|U"[:29]  # same length: no offset moves
    path.write_bytes(bytes(data))
    label = np.random.default_rng(9).integers(0, 256, (120, 200, 3), np.uint8)
    with tifffile.TiffWriter(path, append=True) as tw:
        # as Aperio writes them (NewSubfileType 1 and 9, LZW): openslide finds them so
        tw.write(label, description=f"{HEAD}label 200x120 CANARY4242", photometric="rgb",
                 subfiletype=1, compression="lzw", metadata=None,
                 extratags=[(315, "s", 0, "Dr CANARY4242", True)])
        tw.write(label[::-1].copy(), description=f"{HEAD}macro 200x120 CANARY4242",
                 photometric="rgb", subfiletype=9, compression="lzw", metadata=None)
    with open_slide(path) as slide:
        assert {"label", "macro"} <= set(slide.associated_image_names)
        assert any("CANARY4242" in v for v in slide.properties.values())
    with tifffile.TiffFile(path) as tif:  # the label's stored bytes, to look for in copies
        page = tif.pages[len(tif.pages) - 2]
        tif.filehandle.seek(page.dataoffsets[0])
        stored = tif.filehandle.read(min(4096, page.databytecounts[0]))
    return path, stored


def no_canary(data: bytes | str, where: str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    assert CANARY not in raw and CANARY.lower() not in raw.lower(), where


def test_a_copy_keeps_the_tiles_and_loses_label_macro_and_names(
        canary_slide: tuple[Path, bytes], tmp_path: Path) -> None:
    src, label_bytes = canary_slide
    out = tmp_path / "copy.svs"
    assert len(deidentify_file(src, out)) == 2
    data = out.read_bytes()
    no_canary(data, "the copy's bytes")
    assert label_bytes not in data and label_bytes in src.read_bytes()
    with open_slide(src) as a, open_slide(out) as b:
        assert b.associated_image_names == ("thumbnail",)
        assert b.mpp == a.mpp and b.level_dimensions == a.level_dimensions
        np.testing.assert_array_equal(a.read_region((0, 0), 0, a.dimensions),
                                      b.read_region((0, 0), 0, b.dimensions))
    with tifffile.TiffFile(src) as ta, tifffile.TiffFile(out) as tb:  # tiles byte for byte
        for pa, pb in zip(ta.series[0].levels, tb.series[0].levels, strict=True):
            assert pa.pages[0].dataoffsets == pb.pages[0].dataoffsets
    assert sanitise_aperio(f"{HEAD}x|AppMag = 20|User = a|MPP = 0.5|Date = 1") == \
        f"{HEAD}x|AppMag = 20|MPP = 0.5"


def test_the_cli_copies_files_and_folders(canary_slide: tuple[Path, bytes],
                                          tmp_path: Path) -> None:
    src, _ = canary_slide
    folder = tmp_path / "in" / "case"
    folder.mkdir(parents=True)
    shutil.copy(src, folder / src.name)
    done = subprocess.run([*CLI, "deidentify", str(tmp_path / "in"), str(tmp_path / "out"),
                           "--map", str(tmp_path / "map.csv")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (copy,) = (tmp_path / "out").rglob("*.svs")
    no_canary(copy.name + copy.read_text(errors="replace"), "the copied folder")
    assert load_pseudonyms(tmp_path / "map.csv") == {
        "case/DOE_JOHN_CANARY4242.svs": copy.relative_to(tmp_path / "out").as_posix()}
    inside = subprocess.run([*CLI, "deidentify", str(tmp_path / "in"), str(tmp_path / "o2"),
                             "--map", str(tmp_path / "o2" / "map.csv")], capture_output=True,
                            text=True, timeout=60)
    assert inside.returncode == 2 and "outside" in inside.stderr


def test_unsupported_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="DICOM"):
        deidentify_file(tmp_path, tmp_path / "x.svs")
    (tmp_path / "map.csv").write_text("path,pseudonym\na.svs,p1\nb.svs,p1\n")
    with pytest.raises(InvalidRequestError, match="same pseudonym"):
        load_pseudonyms(tmp_path / "map.csv")


def test_a_deidentified_service_says_no_name(canary_slide: tuple[Path, bytes],
                                            tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    src, label_bytes = canary_slide
    settings = folder_settings(tmp_path, {src.name: src}, deidentify=True)
    (tmp_path / "slides" / "DOE_JANE_CANARY4242_cut.svs").write_bytes(src.read_bytes()[:50_000])
    seen: list[str] = []
    with caplog.at_level(logging.INFO), serve(create_app(settings),
                                              ready_path="/readyz") as url:
        listing = httpx.get(f"{url}/v1/slides").text
        seen.append(listing)
        ids = [i["id"] for i in json.loads(listing)["items"]]
        assert len(ids) == 2
        for sid in ids:
            for resp in (httpx.get(f"{url}/v1/slides/{sid}"),
                         httpx.post(f"{url}/v1/slides/{sid}/plan", json={}),
                         httpx.get(f"{url}/v1/slides/{sid}/tissue",
                                   params={"format": "geojson"}),
                         httpx.post(f"{url}/v1/slides/{sid}/patches?format=ndjson",
                                    json={"strategy": "random", "n_patches": 2}),
                         httpx.post(f"{url}/v1/slides/{sid}/predictions",
                                    json={"strategy": "random", "n_patches": 4})):
                seen.append(resp.text)
        good = next(i for i in json.loads(listing)["items"] if i["size_bytes"] > 50_000)["id"]
        job = httpx.post(f"{url}/v1/jobs", json={"slides": ids, "sampling": {
            "strategy": "random", "n_patches": 6}}).json()["id"]
        status = wait_for_job(url, job)
        seen.append(json.dumps(status))
        assert status["state"] == "partial" and good in status["slides_complete"]
        upload = httpx.post(f"{url}/v1/slides", content=src.read_bytes(),
                            headers={"content-type": "application/octet-stream"})
        assert upload.status_code == 201, upload.text
        seen.append(upload.text)
        info = httpx.get(f"{url}/v1/slides/{upload.json()['id']}").json()
        assert "label" not in info["associated_images"]
        assert "macro" not in info["associated_images"]
    for text in seen:
        no_canary(text, text[:200])
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            no_canary(path.name + str(path.read_bytes()), str(path))
            assert label_bytes not in path.read_bytes(), path
    no_canary("\n".join(r.getMessage() for r in caplog.records), "INFO logs")


def test_a_deidentified_batch_run_says_no_name(canary_slide: tuple[Path, bytes],
                                              tmp_path: Path) -> None:
    src, _ = canary_slide
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(src, root / src.name)
    (root / "DOE_JANE_CANARY4242_cut.svs").write_bytes(src.read_bytes()[:50_000])
    done = subprocess.run([*CLI, "score", str(root), "--out", str(tmp_path / "out"),
                           "--strategy", "random", "-n", "5", "--deidentify"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr  # the cut file fails, saying so without a name
    no_canary(done.stdout + done.stderr, "the CLI's output")
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "features.h5" or p.name == "summary.json" for p in files)
    for path in files:
        no_canary(path.relative_to(tmp_path).as_posix() + str(path.read_bytes()), str(path))
