"""The crop-fidelity study's measurement code (benchmarks/studies/crop_fidelity.py) measures what it says, on
synthetic images. Not part of the test suite (pytest's testpaths is tests/): ``.venv/bin/python -m pytest
benchmarks/studies`` (< 10 s)."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from benchmarks.studies import crop_fidelity as cf


def _photo_like(h=180, w=240, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([120 + 80 * np.sin(x / 9.0), 100 + 60 * np.cos(y / 7.0), 90 + 50 * np.sin((x + y) / 13.0)], -1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, q=95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
    assert ok
    return buf.tobytes()


def test_identical_inputs_give_zero_difference_and_infinite_psnr():
    img = _photo_like()
    assert cf.mad(img, img.copy()) == 0.0
    assert cf.psnr(img, img.copy()) == math.inf
    agg = cf.Agg()
    agg.add(img, img.copy())
    s = agg.summary()
    assert s["mad_mean"] == 0 and s["psnr_mean_db"] == math.inf and s["hf_ratio"] == 1.0
    assert s["mean_ref"] == s["mean_ours"] and s["std_ref"] == s["std_ours"]
    np.testing.assert_allclose(s["mean_ref"], img.reshape(-1, 3).mean(0), atol=0.01)
    np.testing.assert_allclose(s["std_ref"], img.reshape(-1, 3).std(0), atol=0.01)


def test_mad_and_psnr_values():
    a = np.full((4, 4, 3), 100, np.uint8)
    b = a + 10  # every pixel off by 10: MAD 10, MSE 100
    assert cf.mad(a, b) == 10.0
    assert cf.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    assert cf.mad(b, a) == 10.0  # no uint8 wrap-around


def test_reference_path_is_cv2_decode_then_pil_crop_and_bicubic_resize():
    rgb = _photo_like()
    data = _jpeg(rgb)
    dec = cf.decode_cv2_rgb(data)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(dec, bgr[:, :, ::-1])
    for box in [(10, 20, 100, 150), (0, 0, 180, 240), (50, 60, 30, 40)]:
        i, j, h, w = box
        direct = np.asarray(Image.fromarray(dec).crop((j, i, j + w, i + h)).resize((224, 224), Image.BICUBIC))
        np.testing.assert_array_equal(cf.reference_crop(dec, box, "bicubic"), direct)
        direct_bl = np.asarray(Image.fromarray(dec).crop((j, i, j + w, i + h)).resize((224, 224), Image.BILINEAR))
        np.testing.assert_array_equal(cf.reference_crop(dec, box, "bilinear"), direct_bl)


def test_blur_lowers_high_frequency_energy():
    img = _photo_like()
    blurred = cv2.GaussianBlur(img, (0, 0), 1.5)
    assert cf.hf_energy(blurred) < 0.5 * cf.hf_energy(img)
    assert cf.hf_energy(np.full((32, 32, 3), 77, np.uint8)) == 0.0


def test_boxes_follow_torchvision_and_map_to_the_smaller_grid():
    boxes = cf.draw_boxes(375, 500, 20, seed=3)
    assert boxes == cf.draw_boxes(375, 500, 20, seed=3)  # seeded
    for i, j, h, w in boxes:
        assert 0 <= i and i + h <= 375 and 0 <= j and j + w <= 500
        assert 0.08 * 0.99 <= h * w / (375 * 500) <= 1.0
    assert cf.map_box((0, 0, 375, 500), (375, 500), (375, 500)) == (0, 0, 375, 500)
    assert cf.map_box((100, 200, 300, 400), (600, 800), (375, 500)) == (62, 125, 188, 250)


def test_libffcv_resize_is_cv2_inter_area():
    """libffcv's C ``resize`` (what FFCV's crop decoders call) equals cv2.resize INTER_AREA of the box, for a
    shrunk and an enlarged box. The extension is loaded with ctypes, as ffcv/libffcv.py does, without
    importing the ffcv package (numba + torch: seconds)."""
    import ctypes
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("ffcv")
    if spec is None:
        pytest.skip("ffcv not installed")
    so = next(Path(spec.submodule_search_locations[0]).glob("_libffcv*.so"))
    lib = ctypes.CDLL(str(so))
    lib.resize.argtypes = 11 * [ctypes.c_int64]
    img = np.ascontiguousarray(_photo_like(300, 400))
    for box in [(10, 20, 280, 360), (50, 60, 100, 130)]:
        i, j, h, w = box
        dst = np.empty((224, 224, 3), np.uint8)
        lib.resize(0, img.ctypes.data, img.shape[0], img.shape[1], i, i + h, j, j + w, dst.ctypes.data, 224, 224)
        np.testing.assert_array_equal(dst, cf.area_crop(img, box))
