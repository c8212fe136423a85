"""Atomic, durable outputs; files that must never be opened; bounded reads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from wsi_sampler import open_slide
from wsi_sampler._io import atomic_write_text, process_umask
from wsi_sampler.batch import discover
from wsi_sampler.errors import InvalidRequestError, UnsupportedFormatError
from wsi_sampler.plan import compute_tissue_mask


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    process_umask.cache_clear()
    try:
        atomic_write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(old)
        process_umask.cache_clear()
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "old")
    from wsi_sampler._io import atomic_path

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.svs")
    result: list[BaseException] = []

    def try_open() -> None:
        try:
            open_slide(tmp_path / "x.svs")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            result.append(exc)

    thread = threading.Thread(target=try_open, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), "opening a FIFO blocked"
    assert isinstance(result[0], UnsupportedFormatError)
    found = discover(tmp_path)
    assert not found.slides and "not a regular file" in found.skipped[0][1]


def test_a_dicom_folder_with_a_fifo_is_skipped(tmp_path: Path, dicom_dir: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(next(dicom_dir.glob("*.dcm")).read_bytes())
    os.mkfifo(folder / "b.dcm")
    found = discover(tmp_path)
    assert not found.slides and "b.dcm" in found.skipped[0][1]
    with pytest.raises(UnsupportedFormatError):
        open_slide(folder)


def test_a_symlink_loop_is_a_clear_not_found(tmp_path: Path) -> None:
    os.symlink(tmp_path / "b.svs", tmp_path / "a.svs")
    os.symlink(tmp_path / "a.svs", tmp_path / "b.svs")
    with pytest.raises(FileNotFoundError, match="cannot be opened"):
        open_slide(tmp_path / "a.svs")
    assert not discover(tmp_path).slides


@pytest.mark.parametrize("tissue_mpp", [0.01, 0.2, 5e-324, float("nan")])
def test_tissue_masks_need_a_physical_resolution(demo_slide: Path, tissue_mpp: float) -> None:
    with open_slide(demo_slide) as slide, pytest.raises(InvalidRequestError, match="tissue_mpp"):
        compute_tissue_mask(slide, tissue_mpp=tissue_mpp)


def test_a_mask_too_large_names_the_resolution_to_use(medgemma_slide: Path) -> None:
    # 16,384 x 12,288 px at 0.5 µm/px: a mask at full resolution would be 201 Mpx
    with open_slide(medgemma_slide) as slide, \
            pytest.raises(InvalidRequestError, match=r"use tissue_mpp >= 0\.62"):
        compute_tissue_mask(slide, tissue_mpp=0.5)
