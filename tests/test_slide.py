from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from wsi_sampler import (
    CorruptSlideError,
    InvalidRequestError,
    MissingMppError,
    SlideNotFoundError,
    UnsupportedFormatError,
    open_slide,
)

BACKENDS = ["openslide", "tiffslide"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_svs_properties(cmu_svs: Path, backend: str) -> None:
    with open_slide(cmu_svs, backend=backend) as s:  # type: ignore[arg-type]
        assert s.backend == backend
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx((0.499, 0.499))
        assert s.objective_power == 20
        assert s.vendor == "aperio"
        assert set(s.associated_image_names) == {"label", "macro", "thumbnail"}
        label = s.associated_image("label")
        assert label.ndim == 3 and label.shape[2] == 3 and label.dtype == np.uint8


def test_auto_prefers_openslide_and_falls_back_to_tiffslide(
    cmu_svs: Path, kidney_tif: Path
) -> None:
    with open_slide(cmu_svs) as s:
        assert s.backend == "openslide"
    with open_slide(kidney_tif) as s:
        assert s.backend == "tiffslide"
        assert s.dimensions == (1493, 901)
        assert s.mpp is None


def test_ndpi_levels_differ_between_backends(dapi_ndpi: Path) -> None:
    a = open_slide(dapi_ndpi, backend="openslide")
    b = open_slide(dapi_ndpi, backend="tiffslide")
    with a, b:
        assert a.dimensions == b.dimensions == (3968, 4864)
        assert a.level_count == 7 and b.level_count == 4
        assert a.mpp == pytest.approx(b.mpp)
        assert a.vendor == b.vendor == "hamamatsu"


def test_dicom_folder_and_file_open(dicom_dir: Path) -> None:
    with open_slide(dicom_dir) as s:
        assert s.vendor == "dicom"
        assert s.dimensions == (957, 715)
        assert s.mpp == pytest.approx((16.783, 16.783), rel=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_matches_an_independent_decode(demo_slide: Path, backend: str) -> None:
    # The reference is neither backend: tifffile decoding each level's JPEG tiles itself.
    import tifffile

    with tifffile.TiffFile(demo_slide) as tif:
        levels = [lv.asarray() for lv in tif.series[0].levels]
    with open_slide(demo_slide, backend=backend) as s:  # type: ignore[arg-type]
        assert s.level_count == len(levels)
        for level, ref in enumerate(levels):
            ds = s.level_downsamples[level]
            x, y = round(1000 / ds), round(1500 / ds)
            got = s.read_region((1000, 1500), level, (300, 200))
            want = ref[y: y + 200, x: x + 300]
            h, w = want.shape[:2]
            assert got.shape == (200, 300, 3)
            assert int(np.abs(got[:h, :w].astype(int) - want).max()) <= 2  # decoder rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_outside_the_image_is_white(demo_slide: Path, backend: str) -> None:
    with open_slide(demo_slide, backend=backend) as s:  # type: ignore[arg-type]
        w, h = s.dimensions
        region = s.read_region((w - 100, h - 50), 0, (200, 100))
        assert (region[60:, :] == 255).all() and (region[:, 110:] == 255).all()
        assert (region[:50, :100] != 255).any()
        assert (s.read_region((-500, -500), 0, (100, 100)) == 255).all()


def test_thumbnail_sizes(demo_slide: Path) -> None:
    with open_slide(demo_slide) as s:
        assert s.thumbnail(mpp=8.0).shape == (192, 256, 3)
        assert s.thumbnail(max_size=1000).shape == (750, 1000, 3)
        with pytest.raises(InvalidRequestError):
            s.thumbnail(mpp=8.0, max_size=100)


def test_missing_mpp_is_an_explicit_error_naming_the_fix(kidney_tif: Path) -> None:
    with open_slide(kidney_tif) as s, pytest.raises(MissingMppError, match="mpp_override"):
        s.thumbnail(mpp=4.0)
    with open_slide(kidney_tif, mpp_override=0.5) as s:
        assert s.mpp == (0.5, 0.5)
        assert s.thumbnail(mpp=4.0).shape == (113, 187, 3)


def test_fingerprint_stable_and_content_based(cmu_svs: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.svs"
    shutil.copy(cmu_svs, copy)
    with open_slide(cmu_svs) as a, open_slide(copy) as b:
        assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("sha256:")
    info = open_slide(copy).info()
    assert info["width"] == 2220 and info["mpp_x"] == pytest.approx(0.499)


def test_not_found(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError) as exc_info:
        open_slide(tmp_path / "nope.svs")
    assert isinstance(exc_info.value, FileNotFoundError)


def test_zero_byte_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.touch()
    with pytest.raises(CorruptSlideError, match="empty"):
        open_slide(empty)


def test_non_slide_file(tmp_path: Path) -> None:
    txt = tmp_path / "notes.svs"
    txt.write_text("this is not a slide\n" * 100)
    with pytest.raises(UnsupportedFormatError, match="not a supported"):
        open_slide(txt)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_a_truncated_slide_is_refused_at_open(cmu_svs: Path, demo_slide: Path, tmp_path: Path,
                                              backend: str) -> None:
    # Cut anywhere, from the header to the last kilobyte: openslide refuses such files and
    # tiffslide would read zeros for what is missing, so every cut is an error at open.
    for source in (cmu_svs, demo_slide):
        data = source.read_bytes()
        for keep in (200, 1000, len(data) // 3, len(data) * 2 // 3, len(data) * 93 // 100,
                     len(data) - 1000):
            cut = tmp_path / f"cut{keep}.svs"
            cut.write_bytes(data[:keep])
            with pytest.raises((CorruptSlideError, UnsupportedFormatError),
                               match=f"cut{keep}.svs"):
                open_slide(cut, backend=backend)  # type: ignore[arg-type]


def test_a_level_without_tiles_is_refused(demo_slide: Path, tmp_path: Path) -> None:
    from fuzz_corpus import ifd_entries

    data = bytearray(demo_slide.read_bytes())
    offsets = next(e for e in ifd_entries(bytes(data)) if e.tag == 324)  # TileOffsets
    size = 2 if offsets.type == 3 else 4
    data[offsets.value_pos: offsets.value_pos + offsets.count * size] = bytes(
        offsets.count * size)  # every tile of the first level at offset 0: none in the file
    bad = tmp_path / "tileless.svs"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptSlideError, match="none of the .* tiles of image 0"):
        open_slide(bad, backend="tiffslide")


def test_tail_truncated_slide_reports_corruption_on_read(demo_slide: Path, tmp_path: Path) -> None:
    data = demo_slide.read_bytes()
    cut = tmp_path / "tail.svs"
    cut.write_bytes(data[: len(data) // 2])
    for backend in ["auto", *BACKENDS]:
        # Depending on where the cut falls a backend refuses the file or fails on the tiles.
        with pytest.raises((CorruptSlideError, UnsupportedFormatError), match="tail.svs"):
            with open_slide(cut, backend=backend) as s:  # type: ignore[arg-type]
                s.read_region((0, 0), 0, s.dimensions)


def test_empty_folder_is_not_a_slide(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError, match="DICOM"):
        open_slide(tmp_path)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_mpp_override(cmu_svs: Path, bad: float) -> None:
    with pytest.raises(InvalidRequestError):
        open_slide(cmu_svs, mpp_override=bad)


def test_bad_requests(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as s:
        with pytest.raises(InvalidRequestError):
            s.read_region((0, 0), 5, (10, 10))
        with pytest.raises(InvalidRequestError):
            s.read_region((0, 0), 0, (0, 10))
        with pytest.raises(InvalidRequestError):
            s.associated_image("nope")
    with pytest.raises(InvalidRequestError):
        open_slide(cmu_svs, backend="bioformats")  # type: ignore[arg-type]
