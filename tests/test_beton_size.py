"""barlow.beton_size against real converted files: the oracle is always a .beton written by the convert
stage's own code (barlow.convert.convert) and measured with os.stat, never the module's own formula.

FFCV writes whole 8 MiB pages, so a small file's size moves in steps of 8 MiB; the image-folder test
sizes its data at 3-15 pages and allows 3 % + one page. Fixed-size images (Fashion-MNIST, raw) have
no sampling error at all: there the extrapolation must hit the real file to the byte.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from barlow import beton_size
from barlow.convert import WriteOptions, convert
from tests.conftest import FMNIST

PAGE = 8 * 2**20  # FFCV's DatasetWriter default page (4 x its 2 MiB minimum)


def _fmnist(limit: int | None = None) -> dict:
    return {"kind": "fashion_mnist", "path": str(FMNIST), "image_size": 32, "write_mode": "raw", "limit_train": limit}


def photo_folder(root, classes=4, per_class=256, seed=0):
    """An ImageNet-like class-folder tree of real JPEGs: 40 % 400x300, 20 % 300x400, the rest 100-400 px a
    side, cut from one smooth, slightly noisy canvas (JPEG compresses it about as it does photos)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, 400)[None, :, None] + np.linspace(0, 120, 400)[:, None, None]
    canvas = np.clip(ramp * np.array([1.0, 0.7, 0.4]) + rng.normal(0, 8, (400, 400, 3)), 0, 255).astype(np.uint8)
    for c in range(classes):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            r = rng.random()
            w, h = (400, 300) if r < 0.4 else (300, 400) if r < 0.6 else tuple(int(v) for v in rng.integers(100, 400, 2))
            y, x = int(rng.integers(0, 400 - h + 1)), int(rng.integers(0, 400 - w + 1))
            Image.fromarray(canvas[y:y + h, x:x + w]).save(d / f"{i}.JPEG", quality=90)
    return root


def test_a_converted_file_is_its_size_on_disk(fmnist_tiny):
    size = beton_size.of_file(fmnist_tiny["train"])
    assert (size.bytes, size.images, size.source) == (os.path.getsize(fmnist_tiny["train"]), 384, "file")
    assert size.measured and "measured" in size.label()


def test_fixed_size_images_extrapolate_to_the_byte(tmp_path):
    """64 raw 32 px images measured, 6,000 extrapolated: one writer gives the real file exactly; with two,
    each ends on a part-filled page of its own, so the estimate is an upper bound by at most that page."""
    ds = _fmnist(6000)
    one = beton_size.measure(ds, "train", sample=64, workers=1)
    two = beton_size.measure(ds, "train", sample=64, workers=2)
    convert("fashion_mnist", str(FMNIST), "train", tmp_path / "w1.beton", limit=6000, workers=1)
    convert("fashion_mnist", str(FMNIST), "train", tmp_path / "w2.beton", limit=6000, workers=2)
    assert one.bytes == os.path.getsize(tmp_path / "w1.beton")
    assert 0 <= two.bytes - os.path.getsize(tmp_path / "w2.beton") <= PAGE
    assert (one.images, one.source) == (6000, "sample") and "64 of 6,000 images" in one.detail


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.mark.parametrize("mode", ["proportion", "jpg"])
def test_image_folder_sample_is_within_a_page_of_the_real_file(tmp_path, photos, mode):
    """The ImageNet write settings (proportion p 0.5, JPEG quality 90, a max side that resizes the larger
    images) on 1,024 varied images; 256 of them measured. FFCV draws each image's JPEG-or-raw in its
    worker with the global numpy RNG (forked, so seeded here: the oracle file is reproducible); that draw
    alone moves a 1,024-image file by about half a page."""
    root = photos
    ds = {"kind": "image_folder", "path": str(root), "write_mode": mode, "max_resolution": 320, "jpeg_quality": 90,
          "compress_probability": 0.5}
    est = beton_size.measure(ds, "train", workers=1)
    np.random.seed(0)
    convert("image_folder", str(root), "train", tmp_path / "full.beton", workers=1,
            options=WriteOptions(mode, 320, 90, 0.5))
    real = os.path.getsize(tmp_path / "full.beton")
    assert est.images == 1024
    assert abs(est.bytes - real) <= 0.03 * real + PAGE, (est.bytes, real)
    assert real > 3 * PAGE  # the tolerance is not most of the file


def test_the_measurement_is_cached_beside_the_data(tmp_path, monkeypatch):
    ds = _fmnist(500)
    first = beton_size.measure(ds, "train", sample=32, cache=tmp_path / "train.size.json", workers=1)
    assert (tmp_path / "train.size.json").is_file()

    def no_convert(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr("barlow.convert.convert", no_convert)
    again = beton_size.measure(ds, "train", sample=32, cache=tmp_path / "train.size.json", workers=1)
    assert again.bytes == first.bytes
    with pytest.raises(AssertionError, match="converted again"):  # other settings: measured anew
        beton_size.measure({**ds, "write_mode": "jpg"}, "train", sample=32, cache=tmp_path / "train.size.json",
                           workers=1)


def test_for_dataset_prefers_the_converted_file(fmnist_tiny, tmp_path):
    shutil.copy(fmnist_tiny["train"], tmp_path / "train.beton")
    got = beton_size.for_dataset(_fmnist(384), tmp_path, "train")
    assert (got.source, got.bytes) == ("file", os.path.getsize(fmnist_tiny["train"]))


def test_a_layout_the_model_does_not_reproduce_is_refused():
    layout = {"page_size": PAGE, "head": 2106, "meta": 24, "allocs": 1.0, "entry": 24, "payload": [3072] * 10,
              "images": 10}
    # by hand: header + descriptors + metadata padded to one page, one page of images, 10 table entries
    right = PAGE + PAGE + 10 * 24
    beton_size._check_model({**layout, "file_bytes": right}, "x.beton")
    with pytest.raises(RuntimeError, match="not the one barlow.beton_size models"):
        beton_size._check_model({**layout, "file_bytes": right + 1}, "x.beton")


def test_imagenet_fallback_is_ffcvs_published_table_and_says_it_is_assumed():
    # docs.ffcv.io/benchmarks.html, ImageNet at max side 512: JPEG q90 65.47 GB, RAW 616.18 GB
    train = beton_size.assumed("imagenet", "train", 1_281_167)
    assert train.bytes == pytest.approx(0.5 * 65.47e9 + 0.5 * 616.18e9) == pytest.approx(340.825e9)
    assert train.source == "assumed" and train.label() == "assumed, not measured" and not train.measured
    val = beton_size.assumed("imagenet", "val", 50_000)
    assert val.bytes == pytest.approx(340.825e9 * 50_000 / 1_281_167, rel=1e-9)
    jpg = beton_size.assumed("imagenet", "train", 1_281_167, {"write_mode": "jpg", "jpeg_quality": 90})
    assert jpg.bytes == pytest.approx(65.47e9)
