"""Synthetic ImageNet-style class folders of real image files, for the tests and the GPU check.

``write_odd_image_folder`` writes ``root/{train,val}/<class>/<i>.<ext>`` in every mode a user's
ImageNet copy may hold: RGB JPEG, grayscale, CMYK JPEG, RGBA PNG, 16-bit PNG and palette PNG, in turn,
at the given sizes (ImageNet-like aspect ratios, smaller than 224 px and larger than FFCV's max side
alike). ``smooth=True`` gives JPEG-like content (a bilinear upscale of a coarse random grid) instead of
pixel noise, so that encoded sizes and decode times look like photographs'. Needs numpy and PIL, not
torch.
"""
from __future__ import annotations

from pathlib import Path

ODD_SIZES = ((500, 375), (300, 400), (160, 120), (640, 480), (250, 250), (120, 200))  # (w, h), in turn


def write_odd_images(folder: Path, n: int, sizes=ODD_SIZES, seed: int = 0, smooth: bool = False) -> int:
    """``n`` files ``0..n-1`` in ``folder``, the image modes and ``sizes`` (w, h) in turn; returns ``n``."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        if smooth:
            low = rng.integers(0, 256, (max(2, h // 12), max(2, w // 12), 3), dtype=np.uint8)
            rgb = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR))
        else:
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        kind = i % 6
        if kind == 0:
            Image.fromarray(rgb).save(folder / f"{i}.JPEG", quality=90)
        elif kind == 1:
            Image.fromarray(rgb[..., 0]).save(folder / f"{i}.png")                          # L
        elif kind == 2:
            Image.fromarray(rgb).convert("CMYK").save(folder / f"{i}.jpg")                 # CMYK JPEG
        elif kind == 3:
            Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / f"{i}.png")       # RGBA
        elif kind == 4:
            Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(folder / f"{i}.png")  # 16-bit
        else:
            Image.fromarray(rgb).convert("P").save(folder / f"{i}.png")                     # palette
    return n


def _write_job(job: tuple) -> int:
    return write_odd_images(*job)


def write_odd_image_folder(root: Path, classes=("ant", "bee", "cat"), per_class: int = 16,
                           val_per_class: int | None = None, sizes=ODD_SIZES, seed: int = 0, smooth: bool = False,
                           processes: int = 1) -> Path:
    """``root/train/<class>/`` with ``per_class`` files each and ``root/val/<class>/`` with ``val_per_class``
    (default ``max(2, per_class // 2)``); each folder has its own seed, so ``processes`` > 1 (a process pool,
    one folder a job) writes the same files."""
    val = max(2, per_class // 2) if val_per_class is None else val_per_class
    jobs = [(Path(root) / split / c, n, tuple(sizes), seed * 100_003 + 1000 * k + j, smooth)
            for k, (split, n) in enumerate((("train", per_class), ("val", val))) for j, c in enumerate(classes)]
    if processes > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_job, jobs))
    else:
        for job in jobs:
            _write_job(job)
    return Path(root)
