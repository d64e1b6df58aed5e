"""How far FFCV's RandomResizedCrop crops are from the crops the published model was trained on.

For the SAME crop box on real photographs, compare

* reference (MMSelfSup 0.x pretraining): ``cv2.imdecode`` of the original JPEG bytes -> RGB ->
  ``PIL.Image.fromarray`` -> torchvision ``resized_crop(box, 224, BICUBIC)`` (PIL resample);
* reference, bilinear (the linear probes' RandomResizedCrop): the same with PIL BILINEAR;
* ours: the image as ``barlow.convert.convert`` stores it (PIL decode, FFCV's ``resizer``: longest
  side to 500 with ``cv2.INTER_AREA``, then ``jpg`` = ``cv2.imencode`` quality 90, or ``raw``),
  cropped by FFCV's own ``RandomResizedCropRGBImageDecoder`` code (``ResizedCropRGBImageDecoder
  .generate_code``'s ``decode``: libjpeg-turbo ``tjDecompress2`` at full size with TJFLAG_FASTDCT,
  then ``cv::resize(..., INTER_AREA)`` of the box) with the box forced to the reference box mapped
  to the stored image's pixel grid.

The box is forced by running FFCV's Loader with its numba ``Compiler`` disabled (so the decoder's
Python ``decode`` loop runs as written) and a decoder subclass whose crop generator returns the
chosen boxes in order. Every crop is also recomputed with direct calls to ``ffcv.libffcv.imdecode``
and ``ffcv.libffcv.resize_crop`` (the same C functions), and the two must agree bit for bit; the
direct calls are what is timed.

Run: ``.venv/bin/python -m benchmarks.studies.crop_fidelity`` (writes benchmarks/studies/crop_fidelity.md and prints
JSON). ``--help`` for options.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
OUT_MD = Path(__file__).resolve().with_name("crop_fidelity.md")
SIZE = 224
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
MAX_RES = 500
QUALITY = 90

_RUSTDOC = "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/embedded-book/assets"
# Real photographs found offline on this machine (find / -iname '*.jpg' etc.). Missing ones are skipped.
CANDIDATES = [
    ("grace_hopper", "matplotlib mpl-data/sample_data/grace_hopper.jpg (portrait photo)", None),
    ("stm32_board", f"{_RUSTDOC}/f3.jpg (photo of an STM32F3 board)", f"{_RUSTDOC}/f3.jpg"),
    ("stm32_board_leds", f"{_RUSTDOC}/verify.jpeg (photo of the same board, LEDs lit)", f"{_RUSTDOC}/verify.jpeg"),
    ("pier_sky", "google-cloud-sdk .../jetty-home/modules/demo.d/root/images/jetty-pic.png (sky/sea/pier "
     "photo with a logo overlay; PNG, re-encoded here as JPEG q95)",
     "/usr/lib/google-cloud-sdk/platform/google_appengine/google/appengine/tools/java/jetty12/jetty-home/"
     "modules/demo.d/root/images/jetty-pic.png"),
]


# ----------------------------------------------------------------------------- measurement code
def to_gray(img: np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 luma (BT.601)."""
    f = img.astype(np.float32)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def hf_energy(img: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian of the luma: a sharpness / high-frequency measure."""
    return float(np.abs(cv2.Laplacian(to_gray(img), cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT)).mean())


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference on the 0-255 scale."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB for 8-bit images; inf for identical images."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def decode_cv2_rgb(jpeg_bytes: bytes) -> np.ndarray:
    """mmcv.imfrombytes(..., backend='cv2', channel_order='rgb'): cv2.imdecode(IMREAD_COLOR) + BGR->RGB."""
    bgr = cv2.imdecode(np.frombuffer(jpeg_bytes, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def reference_crop(rgb: np.ndarray, box, resample: str = "bicubic", size: int = SIZE) -> np.ndarray:
    """MMSelfSup's crop: PIL.Image.fromarray -> torchvision resized_crop (PIL resample)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[resample]
    i, j, h, w = box
    return np.asarray(F.resized_crop(Image.fromarray(rgb), i, j, h, w, [size, size], interpolation=mode))


def area_crop(rgb: np.ndarray, box, size: int = SIZE) -> np.ndarray:
    """cv2.resize INTER_AREA of the box (what libffcv's resize does), in Python."""
    i, j, h, w = box
    return cv2.resize(rgb[i:i + h, j:j + w], (size, size), interpolation=cv2.INTER_AREA)


def map_box(box, src_hw, dst_hw):
    """Map an integer box (top, left, height, width) from one pixel grid to a resized one (edges rounded)."""
    (H, W), (H2, W2) = src_hw, dst_hw
    i, j, h, w = box
    t, b = round(i * H2 / H), round((i + h) * H2 / H)
    l, r = round(j * W2 / W), round((j + w) * W2 / W)
    t, l = min(t, H2 - 1), min(l, W2 - 1)
    return t, l, max(1, min(b, H2) - t), max(1, min(r, W2) - l)


def draw_boxes(h: int, w: int, n: int, seed: int):
    """n boxes drawn exactly as torchvision's RandomResizedCrop.get_params (global torch RNG, seeded)."""
    import torch
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(seed)
    dummy = torch.empty(3, h, w)
    return [tuple(int(v) for v in RandomResizedCrop.get_params(dummy, list(SCALE), list(RATIO))) for _ in range(n)]


@dataclass
class Agg:
    """Running statistics of one comparison (ours vs reference) over many crops."""
    mads: list = field(default_factory=list)
    psnrs: list = field(default_factory=list)
    mses: list = field(default_factory=list)
    hf_ref: list = field(default_factory=list)
    hf_ours: list = field(default_factory=list)
    s_ref: np.ndarray = field(default_factory=lambda: np.zeros((3, 2)))  # per channel: sum, sum of squares
    s_ours: np.ndarray = field(default_factory=lambda: np.zeros((3, 2)))
    npix: int = 0

    def add(self, ref: np.ndarray, ours: np.ndarray) -> None:
        self.mads.append(mad(ref, ours))
        self.psnrs.append(psnr(ref, ours))
        self.mses.append(float(((ref.astype(np.float64) - ours.astype(np.float64)) ** 2).mean()))
        self.hf_ref.append(hf_energy(ref))
        self.hf_ours.append(hf_energy(ours))
        for s, img in ((self.s_ref, ref), (self.s_ours, ours)):
            f = img.reshape(-1, 3).astype(np.float64)
            s[:, 0] += f.sum(0)
            s[:, 1] += (f * f).sum(0)
        self.npix += ref.shape[0] * ref.shape[1]

    def summary(self) -> dict:
        def ch(s):
            mean = s[:, 0] / self.npix
            return [round(float(v), 2) for v in mean], [round(float(v), 2) for v in np.sqrt(s[:, 1] / self.npix - mean**2)]

        finite = [p for p in self.psnrs if math.isfinite(p)]
        mref, sref = ch(self.s_ref)
        mours, sours = ch(self.s_ours)
        return {
            "crops": len(self.mads),
            "mad_mean": round(statistics.fmean(self.mads), 3),
            "mad_p90": round(float(np.percentile(self.mads, 90)), 3),
            # PSNR of the pooled MSE (identical crops count as MSE 0, not as inf dB)
            "psnr_mean_db": round(10 * math.log10(255.0**2 / statistics.fmean(self.mses)), 2)
            if statistics.fmean(self.mses) > 0 else math.inf,
            "psnr_min_db": round(min(finite), 2) if finite else math.inf,
            "hf_ref": round(statistics.fmean(self.hf_ref), 3),
            "hf_ours": round(statistics.fmean(self.hf_ours), 3),
            "hf_ratio": round(statistics.fmean(self.hf_ours) / statistics.fmean(self.hf_ref), 4),
            "mean_ref": mref, "std_ref": sref, "mean_ours": mours, "std_ours": sours,
        }


# ----------------------------------------------------------------------------- images
def gather_images(workdir: Path, subregions: bool = True) -> list[dict]:
    """The real photographs (as JPEG files in workdir/cls/) plus, optionally, sub-regions of them."""
    import matplotlib
    from PIL import Image

    out = []
    cls = workdir / "photos" / "c0"
    cls.mkdir(parents=True, exist_ok=True)
    for name, desc, path in CANDIDATES:
        if path is None:
            path = str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
        if not Path(path).is_file():
            continue
        dst = cls / f"{len(out):02d}_{name}.jpg"
        if path.lower().endswith((".jpg", ".jpeg")):
            data = Path(path).read_bytes()
        else:
            buf = io.BytesIO()
            Image.open(path).convert("RGB").save(buf, "JPEG", quality=95)
            data = buf.getvalue()
        dst.write_bytes(data)
        out.append({"name": name, "desc": desc, "file": dst, "kind": "photo"})
    if subregions:
        for base in list(out):
            rgb = np.asarray(Image.open(base["file"]).convert("RGB"))
            H, W = rgb.shape[:2]
            # two regions at different scales, both <= 500 px: stored by FFCV at their own size
            for tag, frac, (cy, cx) in (("sub70", 0.70, (0.5, 0.5)), ("sub40", 0.40, (0.35, 0.6))):
                h, w = min(int(H * frac), MAX_RES), min(int(W * frac), MAX_RES)
                t = int(np.clip(cy * H - h / 2, 0, H - h))
                l = int(np.clip(cx * W - w / 2, 0, W - w))
                buf = io.BytesIO()
                Image.fromarray(rgb[t:t + h, l:l + w]).save(buf, "JPEG", quality=95)
                dst = cls / f"{len(out):02d}_{base['name']}_{tag}.jpg"
                dst.write_bytes(buf.getvalue())
                out.append({"name": f"{base['name']}_{tag}", "desc": f"{tag[3:]}% sub-region of {base['name']} "
                            f"({w}x{h}, JPEG q95)", "file": dst, "kind": "subregion"})
    return out


# ----------------------------------------------------------------------------- FFCV's own path
def write_beton(folder: Path, out: Path, mode: str, max_res: int = MAX_RES, quality: int = QUALITY) -> None:
    """The project's converter (barlow.convert.convert, image_folder) with the ImageNet storage options."""
    from barlow.convert import WriteOptions, convert

    convert("image_folder", str(folder.parent), folder.name, out, workers=1,
            options=WriteOptions(mode, max_res, quality, 0.5))


def ffcv_loader_crops(beton: Path, boxes_per_image: list[list[tuple]], size: int = SIZE) -> list[list[np.ndarray]]:
    """Crops from FFCV's RandomResizedCropRGBImageDecoder code with the crop box forced.

    The numba Compiler is disabled so that the decoder's ``decode`` loop runs as Python and calls
    our crop generator, which hands out the boxes in the order the sequential loader asks for them
    (one image per batch, one decode thread, epoch e uses box e of every image)."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler

    queue: deque = deque()

    def forced_crop(height, width, scale, ratio):
        i, j, h, w = queue.popleft()
        assert 0 <= i and i + h <= height and 0 <= j and j + w <= width, (i, j, h, w, height, width)
        return i, j, h, w

    class ForcedCropDecoder(RandomResizedCropRGBImageDecoder):
        @property
        def get_crop_generator(self):
            return forced_crop

    n_img = len(boxes_per_image)
    n_box = len(boxes_per_image[0])
    for e in range(n_box):
        for k in range(n_img):
            queue.append(boxes_per_image[k][e])
    was = Compiler.is_enabled
    Compiler.set_enabled(False)
    try:
        loader = Loader(str(beton), batch_size=1, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [ForcedCropDecoder((size, size))], "label": None}, batches_ahead=1)
        out: list[list[np.ndarray]] = [[] for _ in range(n_img)]
        for _ in range(n_box):
            for k, (img,) in enumerate(loader):
                out[k].append(np.array(img[0]))
    finally:
        Compiler.set_enabled(was)
    assert not queue, f"{len(queue)} boxes unused"
    return out


def stored_image(path: Path, mode: str, max_res: int = MAX_RES, quality: int = QUALITY):
    """What the .beton holds for this file, via FFCV's own writer functions: (payload, (h, w))."""
    from ffcv.fields.rgb_image import encode_jpeg, resizer

    from barlow.convert import load_rgb

    img = resizer(load_rgb(str(path)), max_res)
    if mode == "jpg":
        return encode_jpeg(img, quality), img.shape[:2]
    return np.ascontiguousarray(img), img.shape[:2]


def ffcv_direct_crop(payload: np.ndarray, hw, box, mode: str, temp: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The decoder's per-sample body with direct calls to libffcv's C functions (same arguments)."""
    from ffcv.libffcv import imdecode, resize_crop

    h, w = hw
    if mode == "jpg":
        imdecode(payload, temp, h, w, h, w, 0, 0, 1, 1, False, False)
        src = temp.reshape(-1)[:3 * h * w].reshape(h, w, 3)
    else:
        src = payload.reshape(h, w, 3)
    i, j, bh, bw = box
    resize_crop(src, i, i + bh, j, j + bw, dst)
    return dst


# ----------------------------------------------------------------------------- the run
VARIANTS = [
    # key, reference resample, ours storage, description
    ("jpg_vs_bicubic", "bicubic", "jpg", "FFCV jpg (max 500, q90) + INTER_AREA  vs  MMSelfSup bicubic (pretraining)"),
    ("raw_vs_bicubic", "bicubic", "raw", "FFCV raw (max 500) + INTER_AREA  vs  MMSelfSup bicubic (pretraining)"),
    ("jpg_vs_bilinear", "bilinear", "jpg", "FFCV jpg (max 500, q90) + INTER_AREA  vs  PIL bilinear (probes)"),
    ("raw_vs_bilinear", "bilinear", "raw", "FFCV raw (max 500) + INTER_AREA  vs  PIL bilinear (probes)"),
    # attribution: one factor at a time
    ("area_only_vs_bicubic", "bicubic", "orig_area", "only the resize: INTER_AREA on the original decode  vs  bicubic"),
    ("storage_only_vs_bicubic", "bicubic", "jpg_bicubic", "only the storage: PIL bicubic of the FFCV jpg decode  vs  bicubic"),
    ("downscale_exact_box_vs_bicubic", "bicubic", "raw_bicubic_exact",
     "only the 500-px downscale, unrounded box: PIL bicubic of FFCV raw, float box  vs  bicubic"),
]


def run(n_boxes: int = 50, seed: int = 0, subregions: bool = True, timing_reps: int = 3,
        workdir: Path | None = None) -> dict:
    from PIL import Image

    tmp = tempfile.TemporaryDirectory(prefix="crop_fidelity_") if workdir is None else None
    wd = Path(tmp.name) if tmp else Path(workdir)
    try:
        images = gather_images(wd, subregions)
        folder = wd / "photos"
        betons = {}
        for mode in ("jpg", "raw"):
            betons[mode] = wd / f"{mode}.beton"
            write_beton(folder, betons[mode], mode)

        orig = []  # per image: bytes, decoded ref RGB, boxes, stored payloads
        for k, im in enumerate(images):
            data = im["file"].read_bytes()
            rgb = decode_cv2_rgb(data)
            H, W = rgb.shape[:2]
            boxes = draw_boxes(H, W, n_boxes, seed + k)
            st = {m: stored_image(im["file"], m) for m in ("jpg", "raw")}
            hw = st["jpg"][1]
            orig.append({"bytes": data, "rgb": rgb, "boxes": boxes, "stored": st, "hw": hw,
                         "sboxes": [map_box(b, (H, W), hw) for b in boxes]})
            im["size"] = f"{W}x{H}"
            im["stored"] = f"{hw[1]}x{hw[0]}"

        # FFCV's decoder code with forced boxes, and the direct replica: must be identical
        loader_out = {m: ffcv_loader_crops(betons[m], [o["sboxes"] for o in orig]) for m in ("jpg", "raw")}
        maxh = max(o["hw"][0] for o in orig)
        maxw = max(o["hw"][1] for o in orig)
        temp = np.empty(maxh * maxw * 3, np.uint8)
        identical, total = 0, 0
        aggs = {v[0]: Agg() for v in VARIANTS}
        groups = {g: {v[0]: Agg() for v in VARIANTS} for g in ("photo", "subregion")}
        upscaled = 0
        for k, (im, o) in enumerate(zip(images, orig)):
            jpg_full = None
            for e, (box, sbox) in enumerate(zip(o["boxes"], o["sboxes"])):
                ours = {}
                for m in ("jpg", "raw"):
                    payload, hw = o["stored"][m]
                    direct = ffcv_direct_crop(payload, hw, sbox, m, temp, np.empty((SIZE, SIZE, 3), np.uint8)).copy()
                    total += 1
                    identical += int(np.array_equal(direct, loader_out[m][k][e]))
                    ours[m] = loader_out[m][k][e]
                ours["orig_area"] = area_crop(o["rgb"], box)
                if jpg_full is None:
                    payload, (h, w) = o["stored"]["jpg"]
                    from ffcv.libffcv import imdecode
                    imdecode(payload, temp, h, w, h, w, 0, 0, 1, 1, False, False)
                    jpg_full = temp.reshape(-1)[:3 * h * w].reshape(h, w, 3).copy()
                ours["jpg_bicubic"] = reference_crop(jpg_full, sbox, "bicubic")
                H, W = o["rgb"].shape[:2]
                h2, w2 = o["hw"]
                i, j, bh, bw = box
                fbox = (j * w2 / W, i * h2 / H, (j + bw) * w2 / W, (i + bh) * h2 / H)
                ours["raw_bicubic_exact"] = np.asarray(Image.fromarray(o["stored"]["raw"][0]).resize(
                    (SIZE, SIZE), Image.BICUBIC, box=fbox))
                upscaled += int(sbox[2] < SIZE or sbox[3] < SIZE)
                refs = {r: reference_crop(o["rgb"], box, r) for r in ("bicubic", "bilinear")}
                for key, r, m, _ in VARIANTS:
                    aggs[key].add(refs[r], ours[m])
                    groups[im["kind"]][key].add(refs[r], ours[m])

        # timing: interleaved per crop, medians (single thread, this process)
        cv2.setNumThreads(1)
        times = {"ref_bicubic": [], "ref_bilinear": [], "ours_jpg": [], "ours_raw": [],
                 "ref_bicubic_resize_only": [], "ours_resize_only": []}
        dst = np.empty((SIZE, SIZE, 3), np.uint8)
        pc = time.perf_counter
        for _ in range(timing_reps):
            for o in orig:
                for box, sbox in zip(o["boxes"], o["sboxes"]):
                    t0 = pc(); reference_crop(decode_cv2_rgb(o["bytes"]), box, "bicubic"); t1 = pc()
                    times["ref_bicubic"].append(t1 - t0)
                    t0 = pc(); ffcv_direct_crop(*o["stored"]["jpg"], sbox, "jpg", temp, dst); t1 = pc()
                    times["ours_jpg"].append(t1 - t0)
                    t0 = pc(); reference_crop(decode_cv2_rgb(o["bytes"]), box, "bilinear"); t1 = pc()
                    times["ref_bilinear"].append(t1 - t0)
                    t0 = pc(); ffcv_direct_crop(*o["stored"]["raw"], sbox, "raw", temp, dst); t1 = pc()
                    times["ours_raw"].append(t1 - t0)
                    t0 = pc(); reference_crop(o["rgb"], box, "bicubic"); t1 = pc()
                    times["ref_bicubic_resize_only"].append(t1 - t0)
                    t0 = pc(); ffcv_direct_crop(*o["stored"]["raw"], sbox, "raw", temp, dst); t1 = pc()
                    times["ours_resize_only"].append(t1 - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        return {
            "images": [{k: (str(v) if isinstance(v, Path) else v) for k, v in im.items()} for im in images],
            "n_boxes_per_image": n_boxes, "seed": seed, "crops": len(images) * n_boxes,
            "upscaled_crops": upscaled,
            "ffcv_loader_equals_direct_calls": f"{identical}/{total}",
            "variants": {key: {"desc": d, **aggs[key].summary()} for key, _, _, d in VARIANTS},
            "by_group": {g: {key: {"mad_mean": a.summary()["mad_mean"], "psnr_mean_db": a.summary()["psnr_mean_db"],
                                   "hf_ratio": a.summary()["hf_ratio"]} for key, a in ga.items() if a.mads}
                         for g, ga in groups.items()},
            "time_ms_median": {k: round(v, 4) for k, v in med.items()},
            "speedup_ref_over_ours": {
                "jpg_vs_bicubic": round(med["ref_bicubic"] / med["ours_jpg"], 2),
                "raw_vs_bicubic": round(med["ref_bicubic"] / med["ours_raw"], 2),
                "jpg_vs_bilinear": round(med["ref_bilinear"] / med["ours_jpg"], 2),
                "raw_vs_bilinear": round(med["ref_bilinear"] / med["ours_raw"], 2),
                "resize_only": round(med["ref_bicubic_resize_only"] / med["ours_resize_only"], 2),
            },
            "timing_samples_per_path": len(times["ours_jpg"]),
        }
    finally:
        if tmp:
            tmp.cleanup()


# ----------------------------------------------------------------------------- report
def write_md(res: dict, path: Path, seconds: float) -> None:
    from benchmarks.common import commit, machine, now_iso

    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        head = "unknown"
    v, t, s = res["variants"], res["time_ms_median"], res["speedup_ref_over_ours"]
    L = ["# Crop fidelity: FFCV's RandomResizedCrop decoder vs the upstream crops", "",
         f"Generated by `.venv/bin/python -m benchmarks.studies.crop_fidelity` at {now_iso()} (took {seconds:.0f} s); "
         f"commit `{head}` (`{commit()}`). Do not edit by hand.", "",
         f"Machine: {machine()}.", "",
         f"{res['crops']} crop boxes ({res['n_boxes_per_image']} per image, seed {res['seed']}, torchvision "
         f"`RandomResizedCrop.get_params`, scale 0.08-1, ratio 3/4-4/3) on {len(res['images'])} images; "
         f"each box is used by every path (mapped, edges rounded, to the 500-px stored grid where the image was "
         f"downscaled). {res['upscaled_crops']} of {res['crops']} boxes are smaller than 224 px on a side in the "
         f"stored image, i.e. are enlarged. FFCV's Loader output (decoder code run with the box forced) equals "
         f"the direct libffcv calls for {res['ffcv_loader_equals_direct_calls']} crops.", "",
         "## Fidelity (same box; 224x224 RGB uint8; reference first)", "",
         "| comparison | MAD (0-255) | p90 MAD | PSNR dB (pooled MSE / worst crop) | HF energy ref -> ours (ratio) |",
         "|---|---|---|---|---|"]
    for key, d in v.items():
        L.append(f"| {d['desc']} | {d['mad_mean']:.2f} | {d['mad_p90']:.2f} | {d['psnr_mean_db']:.1f} / "
                 f"{d['psnr_min_db']:.1f} | {d['hf_ref']:.2f} -> {d['hf_ours']:.2f} ({d['hf_ratio']:.3f}) |")
    L += ["", "HF energy = mean |Laplacian| of the luma (4-neighbour, per crop, averaged).", "",
          "By image group (MAD / PSNR dB / HF ratio):", "",
          "| comparison | full photos (downscaled to max side 500) | sub-regions (<= 500 px, stored at own size) |",
          "|---|---|---|"]
    bg = res["by_group"]
    for key in v:
        cells = []
        for g in ("photo", "subregion"):
            d = bg.get(g, {}).get(key)
            cells.append("-" if d is None else f"{d['mad_mean']:.2f} / {d['psnr_mean_db']:.1f} / {d['hf_ratio']:.3f}")
        L.append(f"| {key} | {cells[0]} | {cells[1]} |")
    L += ["", "## Pixel statistics (all crops pooled; per channel R, G, B)", "",
          "| comparison | mean ref | mean ours | std ref | std ours |", "|---|---|---|---|---|"]
    fmt = lambda x: " / ".join(f"{a:.1f}" for a in x)  # noqa: E731
    for key, d in v.items():
        L.append(f"| {key} | {fmt(d['mean_ref'])} | {fmt(d['mean_ours'])} | {fmt(d['std_ref'])} | {fmt(d['std_ours'])} |")
    L += ["", f"## Time per crop (median of {res['timing_samples_per_path']} interleaved single-thread calls, same run)", "",
          "| path | ms | speed-up vs reference |", "|---|---|---|",
          f"| reference: cv2.imdecode(original) + PIL crop + bicubic 224 | {t['ref_bicubic']:.3f} | 1 |",
          f"| reference: cv2.imdecode(original) + PIL crop + bilinear 224 | {t['ref_bilinear']:.3f} | 1 (bilinear) |",
          f"| ours jpg: libffcv imdecode (stored q90, max 500) + resize_crop INTER_AREA | {t['ours_jpg']:.3f} | "
          f"{s['jpg_vs_bicubic']:.2f}x (vs bilinear {s['jpg_vs_bilinear']:.2f}x) |",
          f"| ours raw: resize_crop INTER_AREA of the stored pixels | {t['ours_raw']:.3f} | "
          f"{s['raw_vs_bicubic']:.2f}x (vs bilinear {s['raw_vs_bilinear']:.2f}x) |",
          f"| resize only: PIL crop+bicubic on decoded original vs resize_crop on stored raw | "
          f"{t['ref_bicubic_resize_only']:.3f} vs {t['ours_resize_only']:.3f} | {s['resize_only']:.2f}x |",
          "", "The reference includes decoding the original JPEG each time (as MMSelfSup does per sample); "
          "file reading is excluded from both. FFCV runs the same C calls from numba threads.", "",
          "## Images", ""]
    for im in res["images"]:
        L.append(f"- `{im['name']}`: {im['desc']}; {im['size']} -> stored {im['stored']}")
    L += ["", "## What FFCV does (ffcv 1.0.2 as installed)", "",
          "- Writer (`ffcv/fields/rgb_image.py` `resizer`, l.37-45): if the longest side exceeds `max_resolution`, "
          "`cv2.resize(image, (int(r*w), int(r*h)), interpolation=cv2.INTER_AREA)`, r = 500/max side; then `encode_jpeg` "
          "(l.26-34: RGB->BGR, `cv2.imencode('.jpg', quality 90)`) for jpg records, or the raw pixels (l.360-363). "
          "`proportion` picks jpg with probability 0.5 per image (l.346-350). Our converter decodes the original "
          "with PIL first (`barlow/convert.py` `load_rgb`).",
          "- Decoder (`ResizedCropRGBImageDecoder.generate_code`, l.185-210): jpg records are decoded whole, at full "
          "stored resolution (`imdecode(..., 0, 0, 1, 1, False, False)`: no reduced-scale DCT decode, no crop in the "
          "DCT domain), by libjpeg-turbo `tjDecompress2(..., TJPF_RGB, TJFLAG_FASTDCT)` (libffcv/libffcv.cpp l.104-106 in "
          "the libffcv/ffcv repository: the fast integer IDCT, not libjpeg's default ISLOW that OpenCV/PIL use); the box "
          "from `get_random_crop` (l.48-72) is cut and resized by `resize_crop` -> C `resize` (libffcv.cpp l.33-42): "
          "`cv::resize(src.colRange(..).rowRange(..), dst, (224,224), 0, 0, cv::INTER_AREA)`. INTER_AREA is a box "
          "filter when shrinking; when a side is enlarged OpenCV's INTER_AREA uses its linear-interpolation code with "
          "area weights, close to nearest-neighbour with 1-px linear seams.", ""]
    path.write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes benchmarks/studies/crop_fidelity.md (unless --no-write) and prints the results as JSON.")
    p.add_argument("--boxes", type=int, default=50, help="random crop boxes per image (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the box draws (default 0)")
    p.add_argument("--no-subregions", action="store_true", help="only the whole photographs, no sub-regions")
    p.add_argument("--timing-reps", type=int, default=3, help="timing passes over all boxes (default 3)")
    p.add_argument("--out", type=Path, default=OUT_MD, help=f"markdown report (default {OUT_MD.relative_to(REPO)})")
    p.add_argument("--no-write", action="store_true", help="print JSON only")
    a = p.parse_args(argv)
    t0 = time.time()
    res = run(a.boxes, a.seed, not a.no_subregions, a.timing_reps)
    if not res["images"]:
        print("no real photographs found on this machine", file=sys.stderr)
        return 1
    if not a.no_write:
        write_md(res, a.out, time.time() - t0)
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
