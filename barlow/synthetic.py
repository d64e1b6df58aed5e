"""Synthetic ImageNet-style class folders of real image files, for the tests and the GPU check.

``write_odd_image_folder`` writes ``root/{train,val}/<class>/<i>.<ext>`` in every mode a user's
ImageNet copy may hold: RGB JPEG, grayscale, CMYK JPEG, RGBA PNG, 16-bit PNG and palette PNG, in turn,
at the given sizes (ImageNet-like aspect ratios, smaller than 224 px and larger than FFCV's max side
alike). ``smooth=True`` gives JPEG-like content (a bilinear upscale of a coarse random grid) instead of
pixel noise, so that encoded sizes and decode times look like photographs'. Needs numpy and PIL, not
torch.

``write_cifar10`` / ``write_cifar100`` write CIFAR in its distributed layout and format
(cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta; cifar-100-python/train, test, meta): pickled
dicts with bytes keys (what the archives' Python 2 pickles load as), ``data`` an N x 3072 uint8 array of R,
G, B planes, labels as lists of ints, with only a few random images per file.
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


# ---- CIFAR-10 / CIFAR-100 as distributed (tests/test_cifar.py, benchmarks/smoke.py)
CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_pickle(path: Path, obj) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _images(rng, n):
    import numpy as np

    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 16, test: int = 40, seed: int = 0) -> Path:
    """root/cifar-10-batches-py as extracted from cifar-10-python.tar.gz, ``per_batch`` images a batch."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, (name, n) in enumerate([*((f"data_batch_{k}", per_batch) for k in range(1, 6)), ("test_batch", test)]):
        labels = [int(x) for x in (np.arange(n) + i) % 10]
        write_pickle(d / name, {b"batch_label": f"training batch {i + 1} of 5".encode(), b"labels": labels,
                         b"data": _images(rng, n), b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)]})
    write_pickle(d / "batches.meta", {b"num_cases_per_batch": 10000, b"label_names": CIFAR10_NAMES, b"num_vis": 3072})
    return d


def write_cifar100(root: Path, train: int = 80, test: int = 40, seed: int = 1) -> Path:
    """root/cifar-100-python as extracted from cifar-100-python.tar.gz: fine labels in 0..99 (a few used)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    used = [0, 7, 42, 58, 99]
    for name, n in (("train", train), ("test", test)):
        fine = [used[j % len(used)] for j in range(n)]
        write_pickle(d / name, {b"filenames": [f"{name}_{j}.png".encode() for j in range(n)], b"batch_label": name.encode(),
                         b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": _images(rng, n)})
    write_pickle(d / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return d
