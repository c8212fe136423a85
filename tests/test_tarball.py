"""The fast tar headers of the patch stream are byte-identical to what tarfile writes."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from api.tarball import END, TarMembers, npy_header


@pytest.mark.parametrize(("name", "size"), [
    ("000000.npy", 196_736), ("000042.json", 211), ("123456.png", 0), ("x" * 100, 7),
    ("a" * 101, 3), ("big.bin", 8**11)])
def test_headers_equal_tarfile(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 1_764_000_000, 0o644
    try:
        expected = info.tobuf(tarfile.USTAR_FORMAT)
    except ValueError:  # ustar cannot hold it: ours must refuse the same way
        with pytest.raises(ValueError):
            TarMembers(1_764_000_000.7).header(name, size)
        return
    assert TarMembers(1_764_000_000.7).header(name, size) == expected


def test_members_with_npy_payloads_read_back() -> None:
    members = TarMembers(0)
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    blob = b"".join([*members.member("000001.npy", npy_header(image.shape),
                                     memoryview(image).cast("B")),
                     *members.member("000001.json", b'{"index": 1}'), END])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = tar.getnames()
        array = np.load(io.BytesIO(tar.extractfile("000001.npy").read()))  # type: ignore[union-attr]
    assert names == ["000001.npy", "000001.json"]
    np.testing.assert_array_equal(array, image)
