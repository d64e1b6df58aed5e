"""Convert image datasets to FFCV ``.beton`` files (RGB image + integer label).

Two source kinds:

* ``fashion_mnist`` — the gzipped IDX files Debian's ``dataset-fashion-mnist`` installs
  (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``); 28×28 grey images are zero-padded to
  ``image_size`` and replicated to three channels.
* ``image_folder`` — the ImageNet layout ``<root>/{train,val}/<class>/<image>``, scanned with
  torchvision's own rules (valid extensions, sorted class names -> label ids). ``subset:
  imagenet100`` (the list shipped in ``barlow/datasets/imagenet100.txt``) or ``classes_file:``
  keeps only the listed class folders, so one ImageNet copy serves ImageNet-1k and ImageNet-100.
* ``cifar10`` / ``cifar100`` — the Python-pickle batches exactly as distributed in
  ``cifar-10-python.tar.gz`` (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
  ``batches.meta``) and ``cifar-100-python.tar.gz`` (``cifar-100-python/train``, ``test``, ``meta``;
  the 100 fine labels). train = the 50,000 training images, val = the 10,000 test images; stored as
  raw 32x32 RGB (the presets upsample their crops to 224 px on the batch, see ``barlow.augment``).
  The pickles are read with an unpickler that only builds numpy arrays, so a foreign file cannot run code.

Example::

    convert("fashion_mnist", "/usr/share/datasets/fashion-mnist", "train", "train.beton")
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from barlow import diskwatch
from barlow.atomic import atomic_path
from barlow.errors import BadInput
from barlow.ffcv_import import import_ffcv

# A dataset's image_size when it sets none: the side Fashion-MNIST's 28 px are padded to (ImageNet-style
# folders keep their own sizes, CIFAR is 32 px). Not in the config schema: there an unset image_size
# means "the preset's" (barlow.config.apply_dataset).
IMAGE_SIZE = 32

FMNIST_FILES = {"train": "train", "val": "t10k"}
KINDS = ("fashion_mnist", "image_folder", "cifar10", "cifar100")
DATASETS_DIR = Path(__file__).parent / "datasets"
# Class lists shipped with the package (``subset:``); each file names its source in README.md
# ("ImageNet-100"): imagenet100.txt is HobbitLong/CMC's imagenet100.txt, byte for byte.
SUBSETS = {"imagenet100": DATASETS_DIR / "imagenet100.txt"}


@dataclass(frozen=True)
class WriteOptions:
    """How images are stored. ``raw`` is exact and fastest to decode; the FFCV authors' ImageNet
    setting is ``proportion`` with max side 500, JPEG quality 90, compress probability 0.5."""

    write_mode: str = "raw"
    max_resolution: int | None = None
    jpeg_quality: int = 90
    compress_probability: float = 0.5


def read_idx(path: Path, header: int) -> np.ndarray:
    """Read one gzipped IDX file (magic, dims as big-endian int32, then uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise BadInput(f"{path}: not a readable gzipped IDX file ({e}); reinstall dataset-fashion-mnist") from None
    ndim = raw[3] if len(raw) > 4 else 0
    if len(raw) < header or 4 + 4 * ndim != header:
        raise BadInput(f"{path}: truncated or not an IDX file; reinstall dataset-fashion-mnist")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise BadInput(f"{path}: holds {data.size} values, header says {dims}; the file is truncated")
    return data.reshape(dims)


class FashionMNIST:
    """Indexable (image HxWx3 uint8, label) pairs, as FFCV's DatasetWriter wants them."""

    def __init__(self, root: str | os.PathLike, split: str, image_size: int = IMAGE_SIZE):
        root = Path(root)
        stem = FMNIST_FILES[split]
        images = root / f"{stem}-images-idx3-ubyte.gz"
        labels = root / f"{stem}-labels-idx1-ubyte.gz"
        for p in (images, labels):
            if not p.is_file():
                raise BadInput(f"{p}: missing; install Debian's dataset-fashion-mnist or set datasets.<name>.path")
        self.images = read_idx(images, 16)
        self.labels = read_idx(labels, 8)
        if len(self.images) != len(self.labels):
            raise BadInput(f"{root}: {len(self.images)} images but {len(self.labels)} labels in the {split} split")
        if image_size < 28:
            raise BadInput(f"image_size {image_size}: Fashion-MNIST images are 28 px; use image_size >= 28")
        self.pad = ((image_size - 28) // 2, (image_size - 28 + 1) // 2)
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = np.pad(self.images[i], (self.pad, self.pad))
        return np.repeat(img[:, :, None], 3, axis=2), int(self.labels[i])


def load_rgb(path: str) -> np.ndarray:
    """Decode any PIL-readable image to 8-bit RGB (grey, CMYK, palette, 16-bit, alpha: converted)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: PIL's convert("RGB") clips at 255 instead of rescaling.
            arr = np.asarray(im, dtype=np.float64)
            scale = 65535.0 if arr.max() > 255 else 255.0
            grey = np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        return np.asarray(im.convert("RGB"))


class ImageFolder:
    """``root/<class>/<image>`` scanned by torchvision's rules; bad images are recorded, not raised.

    FFCV's writer runs ``__getitem__`` in worker processes and waits forever if one of them dies,
    so a decoding failure returns a 1×1 placeholder and appends the path to ``error_log``; the
    caller checks the log after writing and discards the whole file if anything failed.
    """

    def __init__(self, root: str | os.PathLike, error_log: Path | None = None, classes: list[str] | None = None,
                 only: list[str] | None = None, only_name: str = "the class list"):
        from barlow.torchvision_import import import_torchvision

        import_torchvision()
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        root = Path(root)
        if not root.is_dir():
            raise BadInput(f"{root}: no such directory; expected <root>/<class>/<image> folders")
        try:
            found, _ = find_classes(str(root))
        except FileNotFoundError:
            raise BadInput(f"{root}: holds no class folders; expected <root>/<class>/<image>") from None
        if only is not None:
            missing = [c for c in only if c not in set(found)]
            if missing:
                raise BadInput(f"{root / missing[0]}: missing class folder ({len(missing)} of the {len(only)} classes of "
                               f"{only_name} missing{': ' + ', '.join(missing[:5]) if len(missing) > 1 else ''}); "
                               "point path: at a full ImageNet copy or fix the list")
            found = sorted(only)
        if classes is not None and found != classes:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise BadInput(f"{root}: class folders differ from the train split (missing {missing[:5]}, extra {extra[:5]}); "
                           "train and val must have the same classes")
        self.classes = found
        index = {c: i for i, c in enumerate(found)}
        for c in found:
            files = [f for f in os.scandir(root / c) if f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS)]
            if not files:
                raise BadInput(f"{root / c}: class folder holds no images ({', '.join(IMG_EXTENSIONS)}); "
                               "add images or remove the folder")
        self.samples = make_dataset(str(root), index, IMG_EXTENSIONS)
        self.root = root
        self.error_log = error_log

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return load_rgb(path), label
        except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
            if self.error_log is not None:
                with open(self.error_log, "a") as log:
                    log.write(f"{path}\t{type(e).__name__}: {e}\n".replace("\n", " ") + "\n")
            return np.zeros((1, 1, 3), np.uint8), label


def read_class_list(subset: str | None = None, classes_file: str | os.PathLike | None = None) -> tuple[list[str], str] | None:
    """The class folders to keep: ``subset`` (a list shipped in barlow/datasets/) or ``classes_file``
    (one folder name per line; blank lines and ``#`` comments ignored). None: keep every folder."""
    if subset and classes_file:
        raise BadInput("dataset: give subset or classes_file, not both")
    if subset:
        if subset not in SUBSETS:
            raise BadInput(f"subset {subset!r}: unknown; use one of {', '.join(SUBSETS)} or classes_file: <list>")
        path, name = SUBSETS[subset], f"subset {subset} ({SUBSETS[subset].name})"
    elif classes_file:
        path, name = Path(classes_file), f"classes_file {classes_file}"
        if not path.is_file():
            raise BadInput(f"{path}: classes_file missing; expected one class folder name per line")
    else:
        return None
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise BadInput(f"{path}: lists no class; expected one class folder name per line")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInput(f"{path}: class {dup[0]} listed twice; each class once")
    return names, name


# CIFAR (https://www.cs.toronto.edu/~kriz/cifar.html): files, keys and label range per kind. The
# archives' Python 2 pickles load with encoding="bytes" (the dataset page's own recipe): bytes keys.
CIFAR_SPECS = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "val": ["test_batch"], "meta": "batches.meta", "labels": "labels", "names": "label_names",
                "classes": 10},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "val": ["test"], "meta": "meta",
                 "labels": "fine_labels", "names": "fine_label_names", "classes": 100},
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only (what the CIFAR batches hold)."""

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            import importlib

            core = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"  # numpy 2 / 1
            return getattr(importlib.import_module(core), name)
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        if (module, name) in allowed:
            return allowed[module, name]
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never does")


def _unpickle_batch(path: Path, kind: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            ImportError, MemoryError) as e:
        raise BadInput(f"{path}: truncated or not a {kind} batch file ({type(e).__name__}: {str(e)[:80]}); "
                       f"expected {what}; re-extract the archive") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: holds a {type(obj).__name__}, not a {kind} batch; expected {what}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


class CIFAR:
    """CIFAR-10 / CIFAR-100 from the distributed Python-pickle batches; (HxWx3 uint8, label) pairs."""

    def __init__(self, kind: str, root: str | os.PathLike, split: str):
        spec = CIFAR_SPECS[kind]
        root = Path(root)
        if not root.is_dir():
            raise BadInput(f"{root}: no such directory; expected the extracted {spec['folder']}/ folder "
                           f"of the {kind} archive (no download: point path: at it)")
        if (root / spec["folder"]).is_dir():
            root = root / spec["folder"]
        files = [*spec[split], spec["meta"]]
        other = "cifar100" if kind == "cifar10" else "cifar10"
        for name in files:
            if not (root / name).is_file():
                looks = [n for n in (*CIFAR_SPECS[other]["train"], CIFAR_SPECS[other]["meta"]) if (root / n).is_file()]
                hint = (f"; {root} holds {', '.join(looks)}: a {other} folder, set kind: {other}" if looks
                        else f"; expected the extracted {spec['folder']}/ folder")
                raise BadInput(f"{root / name}: missing (kind {kind} reads {', '.join(files)}){hint}")
        meta = _unpickle_batch(root / spec["meta"], kind, f"the {kind} meta file with {spec['names']}")
        if spec["names"] not in meta:
            raise BadInput(f"{root / spec['meta']}: has no {spec['names']} (keys: {', '.join(map(str, meta))}); "
                           f"expected {kind}'s meta file" + (f": this is {other}'s, set kind: {other}"
                                                             if CIFAR_SPECS[other]["names"] in meta else ""))
        names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta[spec["names"]]]
        if len(names) != spec["classes"]:
            raise BadInput(f"{root / spec['meta']}: lists {len(names)} {spec['names']}, expected {spec['classes']}")
        self.classes = names
        images, labels = [], []
        for name in spec[split]:
            path = root / name
            what = f"a dict with data (N x 3072 uint8) and {spec['labels']} (N ints in 0..{spec['classes'] - 1})"
            d = _unpickle_batch(path, kind, what)
            if spec["labels"] not in d or "data" not in d:
                is_other = CIFAR_SPECS[other]["labels"] in d
                raise BadInput(f"{path}: has no {spec['labels']} or data (keys: {', '.join(map(str, d))}); expected "
                               f"{what}" + (f"; this is a {other} file, set kind: {other}" if is_other else ""))
            data = np.asarray(d["data"])
            lab = np.asarray(d[spec["labels"]], dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
                raise BadInput(f"{path}: data {data.dtype} {data.shape} with {len(lab)} labels; expected {what}")
            if len(lab) and (lab.min() < 0 or lab.max() >= spec["classes"]):
                raise BadInput(f"{path}: labels span {lab.min()}..{lab.max()}; expected {what}")
            images.append(data)
            labels.append(lab)
        self.images = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # N x 32 x 32 x 3 view
        self.labels = np.concatenate(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return np.ascontiguousarray(self.images[i]), int(self.labels[i])


def open_source(kind: str, path: str, split: str, image_size: int = IMAGE_SIZE, error_log: Path | None = None,
                classes: list[str] | None = None, subset: str | None = None, classes_file: str | None = None):
    if kind == "fashion_mnist":
        if not Path(path).is_dir():
            raise BadInput(f"{path}: dataset directory missing; install Debian's dataset-fashion-mnist "
                           "(apt-get install dataset-fashion-mnist) or fix datasets.<name>.path")
        return FashionMNIST(path, split, image_size)
    if kind in CIFAR_SPECS:
        if subset or classes_file:
            raise BadInput(f"dataset kind {kind}: subset/classes_file apply to image_folder only")
        return CIFAR(kind, path, split)
    if kind == "image_folder":
        only = read_class_list(subset, classes_file)
        return ImageFolder(Path(path) / split, error_log=error_log, classes=classes,
                           only=only[0] if only else None, only_name=only[1] if only else "")
    raise BadInput(f"dataset kind {kind!r}: unknown; use one of {', '.join(KINDS)}")


def _subset(source, n: int) -> list[int]:
    """The first n images, except in a class folder (sorted by class), where ``limit`` takes n
    evenly spaced images so that a small subset (smoke mode, tests) still holds every class."""
    total = len(source)
    if n >= total or not hasattr(source, "samples"):
        return list(range(n))
    return sorted({i * total // n for i in range(n)})


def convert(kind: str, path: str, split: str, out: str | os.PathLike, *, image_size: int = IMAGE_SIZE,
            limit: int | None = None, workers: int = 2, options: WriteOptions = WriteOptions(),
            classes: list[str] | None = None, subset: str | None = None, classes_file: str | None = None) -> dict:
    """Write ``split`` of the dataset to ``out`` (atomically). Returns a summary dict."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = Path(out)
    error_log = out.parent / f".{out.name}.errors"
    error_log.parent.mkdir(parents=True, exist_ok=True)
    error_log.unlink(missing_ok=True)
    source = open_source(kind, path, split, image_size, error_log, classes, subset, classes_file)
    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise BadInput(f"{path} ({split}): no images found")
    indices = _subset(source, n)
    what = f"{path} ({split})"
    # FFCV's writer waits forever when a worker dies on a full disk: check first, watch while writing.
    diskwatch.check(out, diskwatch.estimate(source, indices, options), what)
    fields = {
        "image": RGBImageField(write_mode=options.write_mode, max_resolution=options.max_resolution,
                               jpeg_quality=options.jpeg_quality, compress_probability=options.compress_probability),
        "label": IntField(),
    }
    with atomic_path(out) as tmp, diskwatch.watch(tmp, out, what):
        writer = DatasetWriter(str(tmp), fields, num_workers=max(1, workers))
        writer.from_indexed_dataset(source, indices=indices, chunksize=max(1, min(1000, n // (4 * workers) + 1)))
        if error_log.exists() and error_log.stat().st_size:
            lines = error_log.read_text().splitlines()
            bad, why = lines[0].split("\t", 1)
            raise BadInput(f"{bad}: unreadable image ({why}); fix or delete it and rerun "
                           f"({len(lines)} bad file(s) in total, listed in {error_log})")
    error_log.unlink(missing_ok=True)
    labels = sorted({int(source.labels[i]) for i in range(n)}) if hasattr(source, "labels") else None
    summary = {"split": split, "images": n, "classes": list(source.classes), "label_ids": labels, "out": str(out)}
    if isinstance(source, ImageFolder):
        summary["files"] = _write_file_list(source, indices, out).name
    return summary


def _write_file_list(source: ImageFolder, indices: list[int], out: Path) -> Path:
    """``<out stem>.files.txt``: the ``<class>/<file>`` of .beton index 0, 1, ... one a line, so that a list
    of file names (SimCLR's ImageNet label subsets, barlow.finetune_subset) maps to .beton indices."""
    target = files_list_path(out)
    with atomic_path(target) as tmp:
        tmp.write_text("".join(os.path.relpath(source.samples[i][0], source.root).replace(os.sep, "/") + "\n"
                               for i in indices))
    return target


def files_list_path(beton: str | os.PathLike) -> Path:
    """Where ``convert`` lists the files an image-folder .beton holds, in .beton order."""
    return Path(beton).with_suffix(".files.txt")
