"""One contestant of ``benchmarks.peers``, run by the Python of the contestant's own virtual
environment: ``python peer_driver.py CONTESTANT SLIDE WORKLOAD [COORDS.npy]``.

It goes from the slide file to uint8 arrays of every patch, times that (imports excluded)
and prints one JSON line: ``{"patches": n, "seconds": s}``. Standalone on purpose: only the
standard library, numpy and the contestant's own packages are imported.

Workloads: ``B`` = 224 px at 0.5 µm/px, ``A`` = 256 px at level 0 (the slide is at
0.25 µm/px). Tissue detection is each tool's own; the CLAM-style contestants read the
coordinates wsi-sampler planned (``COORDS.npy``: level-0 x, y), as CLAM reads its own
``create_patches_fp`` coordinates.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

WORKLOADS = {"B": (224, 0.5), "A": (256, 0.25)}  # (patch px, µm/px)
SLIDE_MPP = 0.25
# Every contestant gets the same budget: threads for ours, DataLoader workers for the
# datasets (the parent passes its --workers; default all cores).
WORKERS = int(os.environ.get("WSI_BENCH_WORKERS", "2"))


def _consume(patches: Iterator[Any]) -> int:
    """Materialise every patch as a uint8 array, as a training loop would receive it."""
    n = 0
    for patch in patches:
        arr = np.asarray(patch)
        assert arr.dtype == np.uint8 and arr.ndim >= 3, (arr.dtype, arr.shape)
        n += arr.shape[0] if arr.ndim == 4 else 1
    return n


def ours(slide: str, workload: str, coords: str | None) -> int:
    from wsi_sampler import Extractor, PlanParams, make_plan, open_slide

    size, mpp = WORKLOADS[workload]
    with open_slide(slide) as s:
        plan = make_plan(s, PlanParams(patch_size_px=size, target_mpp=mpp))
        return _consume(b.images for b in Extractor(s, plan, threads=WORKERS).iter_batches())


def _clam_read(slide: str, workload: str, coords: str | None) -> Iterator[np.ndarray]:
    import openslide

    size, mpp = WORKLOADS[workload]
    region = round(size * mpp / SLIDE_MPP)
    assert coords is not None
    with openslide.OpenSlide(slide) as s:
        for x, y in np.load(coords).tolist():
            img = s.read_region((x, y), 0, (region, region)).convert("RGB")
            if region != size:
                img = img.resize((size, size))
            yield np.asarray(img)


def clam_loop(slide: str, workload: str, coords: str | None) -> int:
    """CLAM's Whole_Slide_Bag_FP read: openslide read_region + PIL, one patch at a time."""
    return _consume(_clam_read(slide, workload, coords))


def clam_dataloader(slide: str, workload: str, coords: str | None) -> int:
    """The same read in a torch Dataset, DataLoader(num_workers=WORKERS, batch_size=64)."""
    import openslide
    import torch
    from torch.utils.data import DataLoader, Dataset

    size, mpp = WORKLOADS[workload]
    region = round(size * mpp / SLIDE_MPP)
    assert coords is not None
    xy = np.load(coords)

    class Bag(Dataset[Any]):
        def __init__(self) -> None:
            self.wsi: Any = None

        def __len__(self) -> int:
            return len(xy)

        def __getitem__(self, i: int) -> Any:
            if self.wsi is None:
                self.wsi = openslide.OpenSlide(slide)
            img = self.wsi.read_region((int(xy[i, 0]), int(xy[i, 1])), 0, (region, region))
            img = img.convert("RGB")
            if region != size:
                img = img.resize((size, size))
            return torch.from_numpy(np.array(img))  # a copy, as ToTensor makes

    loader = DataLoader(Bag(), batch_size=64, num_workers=WORKERS)
    return _consume(batch.numpy() for batch in loader)


def tiatoolbox_extractor(slide: str, workload: str, coords: str | None) -> int:
    """TIAToolbox's sliding-window patch extractor over its Otsu tissue mask."""
    from tiatoolbox.tools.patchextraction import get_patch_extractor
    from tiatoolbox.wsicore.wsireader import WSIReader

    size, mpp = WORKLOADS[workload]
    reader = WSIReader.open(slide)
    extractor = get_patch_extractor(
        method_name="slidingwindow", input_img=reader, patch_size=(size, size),
        stride=(size, size), resolution=mpp, units="mpp", input_mask="otsu")
    return _consume(iter(extractor))


def tiatoolbox_dataset(slide: str, workload: str, coords: str | None) -> int:
    """TIAToolbox's WSI patch dataset (its own tissue mask) in DataLoader(num_workers=WORKERS)."""
    from tiatoolbox.models.dataset.dataset_abc import WSIPatchDataset
    from torch.utils.data import DataLoader

    size, mpp = WORKLOADS[workload]
    dataset = WSIPatchDataset(input_img=slide, patch_input_shape=(size, size),
                              stride_shape=(size, size), resolution=mpp, units="mpp",
                              auto_get_mask=True)
    loader = DataLoader(dataset, batch_size=64, num_workers=WORKERS)
    return _consume(batch["image"].numpy() for batch in loader)


def lazyslide(slide: str, workload: str, coords: str | None) -> int:
    """LazySlide: find_tissues, tile_tissues, then every tile read as an array."""
    import lazyslide as zs
    from wsidata import open_wsi

    size, mpp = WORKLOADS[workload]
    wsi = open_wsi(slide)
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, size, mpp=mpp)
    return _consume(tile.image for tile in wsi.iter.tile_images("tiles"))


# Imported before the clock starts: the timing is the work, not the interpreter's imports.
IMPORTS = {
    "wsi-sampler": ["wsi_sampler", "wsi_sampler.extract"],
    "clam-loop": ["openslide"], "clam-dataloader": ["openslide", "torch"],
    "tiatoolbox-extractor": ["tiatoolbox.tools.patchextraction",
                             "tiatoolbox.wsicore.wsireader"],
    "tiatoolbox-dataset": ["tiatoolbox.models.dataset.dataset_abc", "torch"],
    "lazyslide": ["lazyslide", "wsidata"],
}

CONTESTANTS: dict[str, Callable[[str, str, str | None], int]] = {
    "wsi-sampler": ours, "clam-loop": clam_loop, "clam-dataloader": clam_dataloader,
    "tiatoolbox-extractor": tiatoolbox_extractor, "tiatoolbox-dataset": tiatoolbox_dataset,
    "lazyslide": lazyslide,
}


def main() -> None:
    name, slide, workload = sys.argv[1:4]
    coords = sys.argv[4] if len(sys.argv) > 4 else None
    for module in IMPORTS[name]:
        importlib.import_module(module)
    start = time.perf_counter()
    n = CONTESTANTS[name](slide, workload, coords)
    print(json.dumps({"patches": n, "seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
