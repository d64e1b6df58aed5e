"""How many bytes a dataset's ``.beton`` takes — the page cache a stage needs — measured, not guessed.

Three sources, best first (``BetonSize.source``):

* ``file``: the converted ``.beton`` exists; its size on disk (``os.stat``) is the answer.
* ``sample``: before converting, ``SAMPLE`` of the dataset's own images are converted with the dataset's
  own settings by the convert stage's own writer (``barlow.convert.convert``) into a temporary ``.beton``,
  and the file is extrapolated to the whole split from what that file holds: the bytes of every
  sample (FFCV's allocation table), its header and per-image metadata, and FFCV's layout (the header
  and metadata padded to a page, images packed into whole pages, a page begun anew when the next
  image does not fit, the allocation table at the end). The layout model is checked on the sample
  file itself, byte for byte. ``proportion`` (each image JPEG with probability p, drawn by FFCV's
  unseeded ``np.random`` in its workers) is measured as its two parts, the sample written once as
  ``raw`` and once as ``jpg``: a 256-image draw of the mix would add a ±5 % noise of its own.
  The measurement is cached in a JSON file beside the data (``cache=``).
* ``assumed``: the images are not on this machine (the ImageNet presets). ImageNet from FFCV's own
  published table (docs.ffcv.io/benchmarks.html, "Dataset sizes", ImageNet train at max side 512):
  RAW 616.18 GB, JPEG quality 50/90/100 26.35/65.47/176.65 GB. ``proportion`` is p x JPEG + (1 - p) x RAW
  (the table's "Mix" rows do not say their p: at quality 90 its 202.04 GB is p ~ 0.75, not the 0.5 of
  the README's settings, which give 340.8 GB). Max side 500 instead of 512 makes it at most ~5 % high.
  Labelled "assumed, not measured" (barlow.estimate prints the command that measures it).

Sizes are bytes; GB in messages is GiB (2^30), as SLURM counts ``--mem``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

SAMPLE = 256  # images converted for a measured sample
PACK_SEED = 0  # which images of the simulated split are JPEG under proportion: any fixed draw
# FFCV's ImageNet train sizes at max side 512 (1e9 bytes), docs.ffcv.io/benchmarks.html "Dataset sizes"
FFCV_IMAGENET_TRAIN = 1_281_167
FFCV_IMAGENET_GB = {"raw": 616.18, "jpg": {50: 26.35, 90: 65.47, 100: 176.65}}
# Fashion-MNIST / CIFAR, (train, val) in 1e9 bytes: raw 32x32x3 = 3,072 bytes an image (2,730 to an 8 MiB page)
# + 48 bytes of metadata and allocation entry, 2 writers; Fashion-MNIST's 0.203 / 0.042 are its real files here
SMALL_ASSUMED_GB = {"fmnist": (0.203, 0.042), "cifar10": (0.177, 0.042), "cifar100": (0.177, 0.042)}


@dataclasses.dataclass(frozen=True)
class BetonSize:
    bytes: int
    images: int
    source: str  # "file" | "sample" | "assumed"
    detail: str  # where the number comes from

    @property
    def gb(self) -> float:
        return self.bytes / 2**30

    @property
    def measured(self) -> bool:
        return self.source != "assumed"

    def label(self) -> str:
        return {"file": "measured: the .beton's size on disk", "sample": "measured from a converted sample",
                "assumed": "assumed, not measured"}[self.source]


def images_in(path: str | os.PathLike) -> int:
    """Images in a .beton, from its header without FFCV (barlow.runfiles: a launcher imports neither torch
    nor FFCV); a missing or unreadable file gets barlow.loader's one-line error (FFCV is imported only then)."""
    from barlow.runfiles import beton_images

    n = beton_images(Path(path))
    if n is None:
        from barlow.loader import beton_length

        return beton_length(path)  # raises BadInput naming the file
    return n


def of_file(path: str | os.PathLike) -> BetonSize:
    """A converted .beton: its size on disk; its image count from the header."""
    return BetonSize(os.stat(path).st_size, images_in(path), "file", str(path))


# ---- FFCV's layout, read from a file and replayed for another image count ---------------------------
def read_layout(path: str | os.PathLike) -> dict:
    """What the extrapolation needs from a .beton, read from the file: page size, the header + field
    descriptors, metadata bytes an image, allocation-table bytes an image, the bytes of each allocation
    (an image's data) in the order they were packed, and the file's own size (to check the model on it)."""
    from barlow.ffcv_import import import_ffcv

    import_ffcv()
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    r = Reader(str(path))
    n = int(r.num_samples)
    # one writer: the table lists the allocations in the order its pages were filled
    sizes = [int(x) for x in r.alloc_table["size"]]
    return {"page_size": int(r.page_size), "head": int(HeaderType.itemsize + r.field_descriptors.nbytes),
            "meta": int(r.metadata.dtype.itemsize), "allocs": len(sizes) / max(1, n),
            "entry": int(ALLOC_TABLE_TYPE.itemsize), "payload": sizes, "images": n,
            "file_bytes": os.stat(path).st_size}


def _pages(sizes: list[int], page: int) -> int:
    """Pages FFCV's allocator fills with these images, in this order (one writer): an image that does not
    fit in what is left of the page starts the next one."""
    pages, left = 0, 0
    for s in sizes:
        if s > left:
            pages, left = pages + 1, page
        left -= s
    return pages


def file_bytes(layout: dict, images: int, pages: int) -> int:
    """FFCV's file: header + field descriptors + metadata, padded to a page; whole pages; the allocation
    table (one entry per allocation) appended."""
    page = layout["page_size"]
    prefix = layout["head"] + images * layout["meta"]
    if pages:
        prefix = -(-prefix // page) * page
    return int(prefix + pages * page + round(images * layout["allocs"]) * layout["entry"])


def replay(layout: dict, images: int, workers: int = 1, jpg: dict | None = None, p_jpg: float = 0.0) -> int:
    """Bytes of a .beton of ``images`` images written by ``workers`` writer processes, its images drawn by
    cycling through the measured ones (an evenly spread sample, so the cycle has the dataset's mix).
    ``jpg`` (the layout of the same sample written as JPEG) and ``p_jpg``: FFCV's proportion mode, each
    image JPEG with that probability. The pages are those of one writer plus one for each further
    writer process: each packs its own pages and ends on a part-filled one (an upper bound: which
    chunks a worker gets is decided at run time)."""
    count = round(images * layout["allocs"])
    sizes = np.resize(np.asarray(layout["payload"], np.int64), count)
    if jpg is not None and p_jpg > 0:
        pick = np.random.default_rng(PACK_SEED).random(count) < p_jpg
        sizes = np.where(pick, np.resize(np.asarray(jpg["payload"], np.int64), count), sizes)
    pages = _pages(sizes.tolist(), layout["page_size"])
    return file_bytes(layout, images, min(count, pages + max(0, workers - 1)) if count else 0)


def _check_model(layout: dict, path: Path) -> None:
    """The layout model must give the sample file's own size to the byte (one writer): else FFCV's
    layout is not the modelled one and the extrapolation would be a guess."""
    got = file_bytes(layout, layout["images"], _pages(layout["payload"], layout["page_size"]))
    if got != layout["file_bytes"]:
        raise RuntimeError(f"{path}: FFCV's layout is not the one barlow.beton_size models ({layout['file_bytes']:,} "
                           f"bytes on disk, the model says {got:,}); fix the model for this FFCV version")


# ---- a measured sample -----------------------------------------------------------------------------
def _options(dataset: dict):
    from barlow.convert import WriteOptions

    return WriteOptions(dataset.get("write_mode", "raw"), dataset.get("max_resolution"),
                        dataset.get("jpeg_quality", 90), dataset.get("compress_probability", 0.5))


def count_images(dataset: dict, split: str) -> int:
    """Images the convert stage writes for ``split``: the source's, capped by ``limit_<split>``."""
    from barlow.convert import IMAGE_SIZE, open_source

    src = open_source(dataset["kind"], dataset["path"], split, dataset.get("image_size") or IMAGE_SIZE,
                      subset=dataset.get("subset"), classes_file=dataset.get("classes_file"))
    limit = dataset.get(f"limit_{split}")
    return min(len(src), limit) if limit else len(src)


def _convert_sample(dataset: dict, split: str, sample: int, options, out: Path) -> dict:
    from barlow.convert import IMAGE_SIZE, convert

    convert(dataset["kind"], dataset["path"], split, out, image_size=dataset.get("image_size") or IMAGE_SIZE,
            limit=sample, workers=1, options=options, subset=dataset.get("subset"),
            classes_file=dataset.get("classes_file"))
    layout = read_layout(out)
    _check_model(layout, out)
    return layout


def _cache_key(dataset: dict, split: str, sample: int) -> dict:
    from importlib.metadata import version

    keys = ("kind", "subset", "classes_file", "image_size", "write_mode", "max_resolution", "jpeg_quality",
            "compress_probability", f"limit_{split}")
    return {"path": str(Path(dataset["path"]).expanduser().resolve()), "split": split, "sample": sample,
            "ffcv": version("ffcv"), **{k: dataset.get(k) for k in keys}}


def measure(dataset: dict, split: str = "train", *, sample: int = SAMPLE, cache: str | os.PathLike | None = None,
            workers: int | None = None) -> BetonSize:
    """The .beton of ``split`` extrapolated from ``sample`` of its images converted with the dataset's
    settings (a ``datasets:`` entry of config.yaml with its defaults filled in: kind, path, write_mode,
    workers, ...). ``workers``: the convert stage's writer processes (default the dataset's ``workers``). ``cache``: a JSON file that keeps the
    measurement (a later call with the same dataset settings reads it instead of converting again)."""
    opts = _options(dataset)
    workers = workers or dataset["workers"]
    key = _cache_key(dataset, split, sample)
    cached = _read_cache(cache, key)
    if cached is None:
        n = count_images(dataset, split)
        with tempfile.TemporaryDirectory(prefix="beton-sample-") as tmp:
            if opts.write_mode == "proportion":
                layouts = {m: _convert_sample(dataset, split, sample, dataclasses.replace(opts, write_mode=m),
                                              Path(tmp) / f"{m}.beton") for m in ("raw", "jpg")}
            else:
                layouts = {"raw": _convert_sample(dataset, split, sample, opts, Path(tmp) / "sample.beton")}
        cached = {"key": key, "images": n, "layouts": layouts}
        _write_cache(cache, cached)
    n, layouts = cached["images"], cached["layouts"]
    p_jpg = opts.compress_probability if opts.write_mode == "proportion" else 0.0
    size = replay(layouts["raw"], n, workers, layouts.get("jpg"), p_jpg)
    k = layouts["raw"]["images"]
    per = np.mean(layouts["raw"]["payload"]) * (1 - p_jpg)
    if p_jpg:
        per += np.mean(layouts["jpg"]["payload"]) * p_jpg
    how = (f"{k:,} of {n:,} images converted ({opts.write_mode}"
           + (f", JPEG quality {opts.jpeg_quality}" if opts.write_mode != "raw" else "")
           + (f", p {opts.compress_probability:g}" if p_jpg else "")
           + (f", max side {opts.max_resolution}" if opts.max_resolution else "")
           + f"): {per / 1e3:,.1f} kB an image + FFCV's header, metadata, pages and table")
    return BetonSize(size, n, "sample", how + (f"; cached in {cache}" if cache else ""))


def _read_cache(cache, key: dict) -> dict | None:
    if not cache:
        return None
    try:
        data = json.loads(Path(cache).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _write_cache(cache, data: dict) -> None:
    """Best effort: a read-only data folder only costs a new measurement next time."""
    if not cache:
        return
    from barlow.atomic import write_json

    try:
        write_json(Path(cache), data)
    except OSError:
        pass


# ---- assumed, not measured --------------------------------------------------------------------------
def assumed(family: str, split: str, images: int, dataset: dict | None = None) -> BetonSize:
    """The documented fallback for ``family`` (a key of barlow.estimate.DATASETS), scaled to ``images``.
    ``dataset``: its write settings when known (ImageNet-style families), else the README's ImageNet ones
    (proportion, p 0.5, quality 90, max side 500)."""
    if family in SMALL_ASSUMED_GB:
        gb = SMALL_ASSUMED_GB[family][0 if split == "train" else 1]
        return BetonSize(int(gb * 1e9), images, "assumed", "raw 32 px images in FFCV's 8 MiB pages")
    d = {"write_mode": "proportion", "jpeg_quality": 90, "compress_probability": 0.5, **(dataset or {})}
    mode, q, p = d["write_mode"], d["jpeg_quality"], d["compress_probability"]
    near = min(FFCV_IMAGENET_GB["jpg"], key=lambda x: abs(x - q))
    jpg, raw = FFCV_IMAGENET_GB["jpg"][near], FFCV_IMAGENET_GB["raw"]
    if mode == "jpg":
        gb, rule = jpg, f"JPEG q{near} {jpg:g} GB"
    elif mode == "proportion":
        gb, rule = p * jpg + (1 - p) * raw, f"{p:g} x JPEG q{near} {jpg:g} GB + {1 - p:g} x RAW {raw:g} GB"
    else:  # raw, smart (FFCV's smart without a threshold stores raw)
        gb, rule = raw, f"RAW {raw:g} GB"
    why = f"FFCV's published ImageNet sizes at max side 512: {rule} = {gb:.1f} GB per {FFCV_IMAGENET_TRAIN:,} images"
    return BetonSize(int(gb * 1e9 * images / FFCV_IMAGENET_TRAIN), images, "assumed", why)


def for_dataset(dataset: dict, data_dir: str | os.PathLike | None, split: str = "train", *,
                sample: int = SAMPLE) -> BetonSize:
    """A config.yaml dataset's ``split``: the converted file in ``data_dir`` (``<results>/data/<name>``)
    if it is there, else a measured sample (cached in ``data_dir/<split>.size.json``)."""
    data_dir = Path(data_dir) if data_dir else None
    if data_dir and (data_dir / f"{split}.beton").is_file():
        return of_file(data_dir / f"{split}.beton")
    return measure(dataset, split, sample=sample, cache=data_dir / f"{split}.size.json" if data_dir else None)


def for_workflow_dataset(name: str, config: str | os.PathLike = "config.yaml", *, sample: int = SAMPLE) -> dict:
    """{"train", "val": BetonSize} of ``datasets.<name>`` in a workflow config (validated, its defaults
    filled in): the converted files under ``<results>/data/<name>/`` if they are there, else measured
    samples, cached beside them."""
    from barlow import config as barlow_config
    from barlow.errors import BadInput

    cfg = barlow_config.load_yaml(config)
    schema = barlow_config.HERE.parent / "workflow" / "schemas" / "config.schema.yaml"
    barlow_config.validate(cfg, schema, "config", fill=True)
    if name not in cfg["datasets"]:
        raise BadInput(f"--dataset {name}: not in {config}'s datasets ({', '.join(cfg['datasets'])}); name one of them")
    data_dir = Path(cfg["results"]) / "data" / name
    return {split: for_dataset(cfg["datasets"][name], data_dir, split, sample=sample) for split in ("train", "val")}
