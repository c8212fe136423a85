"""The image encoders: PNG is lossless for every reader, JPEG is libjpeg-turbo's own bytes."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from wsi_sampler.encoding import encode_image, encode_jpeg, encode_png
from wsi_sampler.errors import InvalidRequestError


def _tissue_like(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    noisy = np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255)
    img = noisy.astype(np.uint8)
    if channels == 1:
        return np.ascontiguousarray(img[:, :, 0])
    if channels == 4:
        return np.dstack([img, rng.integers(0, 256, (h, w), dtype=np.uint8)])
    return img


def _pil(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("shape", [(256, 256), (1, 1), (1, 37), (53, 1), (31, 250)])
def test_png_is_lossless_for_pil_and_opencv(channels: int, shape: tuple[int, int]) -> None:
    img = _tissue_like(*shape, channels)
    data = encode_png(img)
    assert np.array_equal(_pil(data), img)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if channels == 3:
        back = back[:, :, ::-1]
    elif channels == 4:
        back = back[:, :, [2, 1, 0, 3]]
    assert np.array_equal(back, img)


def test_png_of_a_view_and_of_extremes() -> None:
    img = _tissue_like(64, 80, 3)
    view = img[::2, 5:, :]  # not contiguous
    assert np.array_equal(_pil(encode_png(view)), view)
    edges = np.zeros((9, 9, 3), np.uint8)
    edges[::2] = 255  # row differences wrap around mod 256
    assert np.array_equal(_pil(encode_png(edges)), edges)


def test_png_is_no_bigger_than_libpng_at_level_1() -> None:
    img = _tissue_like(256, 256, 3)
    ours = encode_png(img)
    ok, theirs = cv2.imencode(".png", img[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok and len(ours) <= 1.1 * len(theirs)


@pytest.mark.parametrize("quality", [75, 95])
@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_bytes_are_opencvs(quality: int, channels: int) -> None:
    img = _tissue_like(256, 200, channels, seed=quality)
    arr = img[:, :, ::-1] if channels == 3 else img
    ok, expected = cv2.imencode(".jpg", np.ascontiguousarray(arr),
                                [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    assert encode_jpeg(img, quality) == expected.tobytes()
    assert encode_image(img, ".jpg", jpeg_quality=quality) == expected.tobytes()


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((0, 4, 3), np.uint8), np.zeros(4, np.uint8)])
def test_what_cannot_be_encoded_is_a_clear_error(bad: np.ndarray) -> None:
    with pytest.raises(InvalidRequestError):
        encode_png(bad)
    with pytest.raises(InvalidRequestError):
        encode_jpeg(bad)


def test_jpeg_refuses_alpha_and_unknown_extensions() -> None:
    with pytest.raises(InvalidRequestError, match="alpha"):
        encode_jpeg(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(InvalidRequestError, match="unknown image format"):
        encode_image(np.zeros((4, 4, 3), np.uint8), ".gif")
