"""DeepZoom geometry and tiles against openslide's own DeepZoomGenerator: the same levels,
tile grid and read arithmetic, and the same pixels (PNG-exact), on real and generated
slides, with and without overlap and limit_bounds."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import openslide
import pytest
from _slides import damaged_first_tile
from openslide.deepzoom import DeepZoomGenerator

from wsi_sampler import open_slide
from wsi_sampler.deepzoom import DecodedTiles, DeepZoom, thumbnail_size
from wsi_sampler.errors import CorruptSlideError, InvalidRequestError

PARAMS = [(254, 1, False), (256, 0, False), (240, 2, True)]
# A non-empty region as scanners that record one give it (MIRAX, Ventana): our slides have
# none, so the tests add the same properties to both readers.
BOUNDS = {"openslide.bounds-x": "1000", "openslide.bounds-y": "800",
          "openslide.bounds-width": "5001", "openslide.bounds-height": "3999"}


class WithBounds:
    """A real OpenSlide handle whose properties also name a bounding box."""

    def __init__(self, osr: openslide.OpenSlide) -> None:
        self._osr = osr

    def __getattr__(self, name: str) -> object:
        return getattr(self._osr, name)

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties) | BOUNDS


def sample_tiles(dz: DeepZoomGenerator) -> list[tuple[int, int, int]]:
    """Every tile of the coarse levels, the corners and the middle of the finer ones."""
    out = []
    for level, (cols, rows) in enumerate(dz.level_tiles):
        if cols * rows <= 16:
            out += [(level, c, r) for c in range(cols) for r in range(rows)]
        else:
            out += [(level, c, r) for c in {0, cols // 2, cols - 1}
                    for r in {0, rows // 2, rows - 1}]
    return out


@pytest.mark.parametrize(("tile_size", "overlap", "limit_bounds"), PARAMS)
@pytest.mark.parametrize("which", ["cmu", "demo", "demo with bounds"])
def test_tiles_equal_openslides_deepzoom_generator(
        which: str, tile_size: int, overlap: int, limit_bounds: bool, cmu_svs: Path,
        demo_slide: Path) -> None:
    path = cmu_svs if which == "cmu" else demo_slide
    osr: object = openslide.OpenSlide(str(path))
    if which == "demo with bounds":
        osr = WithBounds(osr)  # type: ignore[arg-type]
    reference = DeepZoomGenerator(osr, tile_size=tile_size, overlap=overlap,
                                  limit_bounds=limit_bounds)
    with open_slide(path) as slide:
        if which == "demo with bounds":
            slide.properties.update(BOUNDS)
        ours = DeepZoom(slide, tile_size=tile_size, overlap=overlap, limit_bounds=limit_bounds)
        assert ours.level_dimensions == reference.level_dimensions
        assert ours.level_tiles == reference.level_tiles
        for level, col, row in sample_tiles(reference):
            (l0, slide_level, l_size), z_size = reference._get_tile_info(level, (col, row))
            where = ours.tile_read(level, col, row)
            assert (where.l0_location, where.slide_level, where.level_size, where.size) == (
                tuple(l0), slide_level, tuple(l_size), tuple(z_size)), (level, col, row)
            want = np.asarray(reference.get_tile(level, (col, row)))
            got = ours.tile(level, col, row)
            assert got.shape == want.shape, (level, col, row)
            diff = np.abs(got.astype(int) - want.astype(int))
            assert diff.max() == 0, (level, col, row, diff.max())


@pytest.mark.parametrize("which", ["cmu", "demo"])
def test_jpeg_tiles_decoded_scaled_stay_within_jpegs_own_error(
        which: str, cmu_svs: Path, demo_slide: Path) -> None:
    """``dct_scaling`` (the service's JPEG tiles): levels read at 2-8x the tile's resolution
    are decoded at the smaller size; each tile has the generator's size, and differs from
    its pixels by less than Pillow's own q90 JPEG of them does."""
    import io

    from PIL import Image

    path = cmu_svs if which == "cmu" else demo_slide
    reference = DeepZoomGenerator(openslide.OpenSlide(str(path)))
    with open_slide(path) as slide:
        ours = DeepZoom(slide, decoded=DecodedTiles(64))
        scaled = 0
        for level, col, row in sample_tiles(reference):
            want = np.asarray(reference.get_tile(level, (col, row))).astype(int)
            got = ours.tile(level, col, row, dct_scaling=True)
            assert got.shape == want.shape, (level, col, row)
            buf = io.BytesIO()
            Image.fromarray(want.astype(np.uint8)).save(buf, "JPEG", quality=90)
            own_error = np.abs(np.asarray(Image.open(buf)).astype(int) - want).mean()
            error = np.abs(got.astype(int) - want).mean()
            assert error <= own_error, (level, col, row, error, own_error)
            scaled += ours.tile_read(level, col, row).level_size[0] >= 2 * got.shape[1]
        decoded_scales = {key[2] for key in ours.decoded._items}
        assert scaled >= 6 and decoded_scales >= {1, 2, 4}, decoded_scales


def test_remote_tiles_fetched_ahead_are_never_left_behind(demo_slide: Path) -> None:
    """Over a remote source, each DeepZoom read fetches its missing stored tiles ahead in
    batches; bytes fetched for a tile another request decoded meanwhile are dropped, not
    kept: after many concurrent tiles nothing is held ahead, and the pixels are the file's."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_sampler._tiles import PreadFetch, TileSource

    class Remote(PreadFetch):  # the file's bytes, fetched as a remote store is (ahead)
        remote = True
        batch = 4

    with open_slide(demo_slide) as local, open_slide(demo_slide) as remote:
        source = local.tile_source()
        assert source is not None
        over_the_wire = TileSource("remote", source.levels, Remote(demo_slide))
        remote._tiles, remote._tiles_probed = over_the_wire, True
        class Racing(DecodedTiles):  # as if another request decoded each tile meanwhile
            def __contains__(self, key: object) -> bool:
                return False

        ours, reference = DeepZoom(remote, decoded=Racing()), DeepZoom(local)
        top = ours.level_count - 1
        tiles = [(level, c, r) for level in (top, top - 1) for c in range(4) for r in range(3)]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda t: ours.tile(*t, dct_scaling=True), tiles * 2))
        for tile, pixels in zip(tiles * 2, got, strict=True):
            np.testing.assert_array_equal(pixels, reference.tile(*tile, dct_scaling=True))
        assert not over_the_wire._ahead
        over_the_wire.close()


def test_a_damaged_stored_tile_is_an_error_each_time_never_a_blank_tile(
        tmp_path: Path) -> None:
    path = damaged_first_tile(tmp_path / "bad.svs")
    with open_slide(path) as slide:
        dz = DeepZoom(slide)
        top = dz.level_count - 1
        for level, dct in ((top, False), (top, True), (top - 1, True), (top - 1, False)):
            for _ in range(2):  # a failed decode is not kept: the next request fails too
                with pytest.raises(CorruptSlideError, match="tile 0,0 of level 0"):
                    dz.tile(level, 0, 0, dct_scaling=dct)
        assert dz.tile(top, 3, 3).shape == (256, 256, 3)  # the others still read


def test_thumbnail_size_is_pillows() -> None:
    from PIL import Image

    rng = np.random.default_rng(3)
    for _ in range(400):
        size = (int(rng.integers(1, 700)), int(rng.integers(1, 700)))
        box = (int(rng.integers(1, 400)), int(rng.integers(1, 400)))
        image = Image.new("L", size)
        image.thumbnail(box)
        assert thumbnail_size(size, box) == image.size, (size, box)


def test_decoded_tiles_stay_in_budget_and_decode_each_tile_once() -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    cache = DecodedTiles(budget_mb=1)  # 5 tiles of 256 x 256 RGB
    loads: list[int] = []
    lock = threading.Lock()

    def load(i: int) -> np.ndarray:
        with lock:
            loads.append(i)
        time.sleep(0.05)
        return np.full((256, 256, 3), i, np.uint8)

    with ThreadPoolExecutor(8) as pool:  # 8 threads want tile 0 at once: one decode
        tiles = list(pool.map(lambda _: cache.get(("s", 0), lambda: load(0)), range(8)))
    assert loads == [0] and all(t is tiles[0] for t in tiles)
    for i in range(1, 20):
        assert cache.get(("s", i), lambda i=i: load(i))[0, 0, 0] == i
        assert cache.used <= cache.budget
    assert len(cache._items) == 5 and ("s", 19) in cache and ("s", 1) not in cache
    with pytest.raises(ValueError, match="damaged"):  # a failed decode is not kept
        cache.get(("s", 99), lambda: (_ for _ in ()).throw(ValueError("damaged")))
    assert ("s", 99) not in cache


def test_dzi_describes_the_pyramid_and_bad_tiles_are_clear_errors(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as slide:
        dz = DeepZoom(slide)
        root = ElementTree.fromstring(dz.dzi("jpeg"))
        size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
        assert root.get("TileSize") == "254" and root.get("Overlap") == "1"
        assert root.get("Format") == "jpeg" and size is not None
        assert (int(size.get("Width", 0)), int(size.get("Height", 0))) == slide.dimensions
        top = dz.level_count - 1
        cols, rows = dz.level_tiles[top]
        with pytest.raises(InvalidRequestError, match="does not exist"):
            dz.tile_read(top, cols, 0)
        with pytest.raises(InvalidRequestError, match="level 99 does not exist"):
            dz.tile_read(99, 0, 0)
        with pytest.raises(InvalidRequestError, match="overlap"):
            DeepZoom(slide, tile_size=8, overlap=5)


def test_the_api_serves_the_pyramid_as_openseadragon_asks_for_it(
        tmp_path: Path, cmu_svs: Path) -> None:
    """The .dzi and the tile URLs OpenSeadragon derives from it (query string carried):
    the generator's pixels (PNG exact, JPEG within its error), stored tiles passed through,
    ETag / 304 / immutable with the fingerprint, API keys, clear errors."""
    import io

    import httpx
    from _servers import folder_settings, serve, slide_ids
    from PIL import Image

    from api.app import create_app

    settings = folder_settings(tmp_path, {"cmu.svs": cmu_svs}, api_keys=["k3y"])
    auth = {"Authorization": "Bearer k3y"}
    reference = DeepZoomGenerator(openslide.OpenSlide(str(cmu_svs)))
    top = reference.level_count - 1
    with serve(create_app(settings), ready_path="/readyz") as url:
        sid = slide_ids(url, api_key="k3y")["cmu.svs"]
        base = f"{url}/v1/slides/{sid}"
        dzi = httpx.get(f"{base}/deepzoom.dzi", headers=auth)
        assert dzi.status_code == 200 and dzi.headers["content-type"] == "application/xml"
        size = ElementTree.fromstring(dzi.text)[0]
        assert (int(size.get("Width", 0)), int(size.get("Height", 0))) == \
            reference.level_dimensions[-1]
        fingerprint = dzi.headers["X-Slide-Fingerprint"]
        assert httpx.get(f"{base}/deepzoom.dzi").status_code == 401  # the key is needed
        for level, col, row in [(top, 0, 0), (top, 3, 5), (top - 2, 1, 1), (2, 0, 0)]:
            want = np.asarray(reference.get_tile(level, (col, row)))
            png = httpx.get(f"{base}/deepzoom_files/{level}/{col}_{row}.png", headers=auth)
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.content))), want)
            jpeg = httpx.get(f"{base}/deepzoom_files/{level}/{col}_{row}.jpeg", headers=auth)
            got = np.asarray(Image.open(io.BytesIO(jpeg.content)).convert("RGB"))
            assert got.shape == want.shape
            # within JPEG's own error: Pillow's JPEG of the generator's tile at the same q90
            buf = io.BytesIO()
            Image.fromarray(want).save(buf, "JPEG", quality=90)
            pillow = np.asarray(Image.open(buf).convert("RGB")).astype(int)
            own_error = np.abs(pillow - want.astype(int)).mean()
            assert np.abs(got.astype(int) - want.astype(int)).mean() <= 1.2 * own_error + 0.2
        # 240 px tiles without overlap at the native level: the scanner's own JPEG tiles
        with open_slide(cmu_svs) as slide:
            source = slide.tile_source()
            assert source is not None
            stored = source.stored_jpeg(0, 2, 3)
        native = httpx.get(f"{base}/deepzoom_files/{top}/2_3.jpeg?tile_size=240&overlap=0",
                           headers=auth)
        assert native.content == stored
        # caching: revalidation by ETag, immutable when the URL names the fingerprint
        tile_url = f"{base}/deepzoom_files/{top}/0_0.jpeg"
        first = httpx.get(tile_url, headers=auth)
        assert first.headers["cache-control"] == "private, no-cache"
        again = httpx.get(tile_url, headers=auth | {"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and not again.content
        pinned = httpx.get(f"{tile_url}?v={fingerprint}", headers=auth)
        assert "immutable" in pinned.headers["cache-control"]
        for bad, status in ((f"{base}/deepzoom_files/{top}/0_0.gif", 422),
                            (f"{base}/deepzoom_files/{top}/999_0.jpeg", 422),
                            (f"{base}/deepzoom_files/99/0_0.jpeg", 422),
                            (f"{url}/v1/slides/nope/deepzoom.dzi", 404),
                            (f"{base}/deepzoom.dzi?overlap=-1", 422)):
            answer = httpx.get(bad, headers=auth)
            assert answer.status_code == status, (bad, answer.text)
            assert "error" in answer.json()


def test_the_tile_server_shares_open_slides_and_closes_none_in_use(demo_slide: Path) -> None:
    """Concurrent tiles of one slide open it once; past MAX_OPEN the least recently used
    slide is retired, and closed only when the request reading it ends."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from api import tiles
    from api.tiles import TileParams, TileServer

    opened: list[object] = []
    lock = threading.Lock()

    class Registry:  # the service's registry maps ids to files; here every id is the demo
        def open(self, slide_id: str) -> object:
            slide = open_slide(demo_slide)
            with lock:
                opened.append(slide)
            return slide

    server = TileServer(Registry(), cache_mb=1)  # type: ignore[arg-type]
    params = TileParams(254, 1, "jpeg", 90, False)
    server.tile("a", params, 13, 0, 0)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda c: server.tile("a", params, 13, c, 0), range(1, 9)))
    assert len(opened) == 1 and len(server._open) == 1
    with server._using("a") as busy:  # a request still reading slide "a"
        for i in range(tiles.MAX_OPEN):
            server.tile(f"other-{i}", params, 13, 0, 0)
        assert "a" not in server._open and busy.retired
        assert busy.slide.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)  # still open
    with pytest.raises(CorruptSlideError, match="closed slide"):  # closed after its last user
        busy.slide.read_region((0, 0), 0, (8, 8))
    server.close()
