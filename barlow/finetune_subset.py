"""The labelled train subset of a semi-supervised fine-tune (barlow.finetune), torch-free.

Two kinds, both written to one JSON file that the fine-tune's output records (path and sha256):

* ``simclr``: SimCLR's ImageNet lists (``barlow/splits/{1,10}percent.txt``, what the Barlow Twins
  ``evaluate.py`` downloads at run time), read only after their sha256 matches the shipped one. Each
  listed ``<wnid>_<n>.JPEG`` is ``train/<wnid>/<file>`` (evaluate.py's own rule); the converter lists the
  ``<class>/<file>`` of every .beton index in ``<stem>.files.txt`` (barlow.convert), which maps the names to
  indices. A listed image the .beton lacks stops the run with one line naming it: a partial ImageNet would
  silently make a smaller, different split than the published one.
* ``balanced``: any other dataset (or percent): ``round(n x percent / 100)`` images (at least one a
  class), the same number from every class (one more for the remainder's classes, drawn with the seed among
  those with an image to spare), drawn with numpy's generator of ``seed``; a class too small for its share
  stops the run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from barlow import layout
from barlow.errors import BadInput
from barlow.provenance import file_sha256

SPLITS_DIR = Path(__file__).parent / "splits"
# percent -> (file, sha256): barlow/splits/SOURCE.md names the upstream repository, path and commit
SPLITS = {
    1: ("1percent.txt", "71e82a48ba78252683ae334c4d019ebd5c6e855b9599c1389fbe83eb9549cf17"),
    10: ("10percent.txt", "6d09de11e7bdaf5b1f3b1f249b6183695f97310cdd20f0c03e7235b6b9392091"),
}
UPSTREAM = "google-research/simclr imagenet_subsets/ (barlow/splits/SOURCE.md)"
WNID = re.compile(r"n\d{8}")


def read_split(percent: float, directory: str | Path = SPLITS_DIR) -> list[str]:
    """SimCLR's list of ``percent`` (1 or 10) as file names, after its sha256 is checked."""
    if percent not in SPLITS:
        raise BadInput(f"finetune percent {percent:g}: SimCLR's ImageNet lists exist for 1 and 10 only; use "
                       "finetune.subset: balanced for other fractions")
    name, want = SPLITS[percent]
    path = Path(directory) / name
    if not path.is_file():
        raise BadInput(f"{path}: missing; reinstall the package (barlow/splits/ ships {name} from {UPSTREAM})")
    got = file_sha256(path)
    if got != want:
        raise BadInput(f"{path}: sha256 {got} is not the shipped {name}'s {want}; restore the file from {UPSTREAM}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def files_of(beton: str | Path) -> list[str] | None:
    """The ``<class>/<file>`` of each .beton index (convert's ``<stem>.files.txt``), or None where the
    converter wrote none (Fashion-MNIST, CIFAR, or a .beton converted before it listed files)."""
    from barlow.convert import files_list_path

    path = files_list_path(beton)
    return path.read_text().splitlines() if path.is_file() else None


def simclr_indices(names: list[str], files: list[str], classes: list[str], what: str) -> tuple[list[int], int]:
    """The .beton indices of the listed file names, ascending, and how many listed images belong to classes the
    .beton does not hold (a class subset such as ImageNet-100 keeps its own classes' images only)."""
    where = {f: i for i, f in enumerate(files)}
    held = set(classes)
    out, other, missing = [], 0, []
    for name in names:
        cls = name.split("_")[0]
        if cls not in held:
            other += 1
            continue
        i = where.get(f"{cls}/{name}")
        if i is None:
            missing.append(name)
        else:
            out.append(i)
    if missing:
        first = missing[0]
        raise BadInput(f"{what}: lists {first} (train/{first.split('_')[0]}/{first}), which the train .beton does "
                       f"not hold ({len(missing)} listed image(s) missing); convert the full ImageNet train split")
    if not out:
        raise BadInput(f"{what}: none of its images is in the train .beton (classes {', '.join(classes[:3])}...); "
                       "use finetune.subset: balanced for a dataset other than ImageNet")
    return sorted(out), other


def balanced_indices(labels, percent: float, seed: int) -> list[int]:
    """An equal number of indices of every label (``round(n x percent / 100)`` in all, at least one a class;
    the remainder's extra image goes to classes drawn with ``seed`` among those with one to spare), ascending."""
    labels = np.asarray(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    total = max(len(classes), int(round(len(labels) * percent / 100)))
    share, remainder = divmod(total, len(classes))
    small = np.flatnonzero(sizes < share)
    if len(small):
        raise BadInput(f"finetune percent {percent:g}: class {int(classes[small[0]])} has {int(sizes[small[0]])} train "
                       f"image(s), fewer than its share of {share}; choose a smaller fraction")
    rng = np.random.default_rng(seed)
    spare = np.flatnonzero(sizes > share)  # the remainder's extra images come from classes that have one to give
    if remainder > len(spare):
        raise BadInput(f"finetune percent {percent:g}: {remainder} classes must give {share + 1} images, only "
                       f"{len(spare)} have that many; choose a smaller fraction")
    extra = set(spare[rng.permutation(len(spare))[:remainder]].tolist())
    out = []
    for k, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        out.extend(rng.permutation(members)[:share + (k in extra)].tolist())
    return sorted(int(i) for i in out)


def read_labels(beton: str | Path) -> np.ndarray:
    """The label of every .beton index, from the file's metadata (no image is decoded)."""
    from barlow.ffcv_import import import_ffcv

    import_ffcv()
    from ffcv.reader import Reader

    r = Reader(str(beton))
    return np.asarray(r.metadata[f"f{r.field_names.index('label')}"]).reshape(-1).astype(np.int64)


def _summary(beton: Path) -> dict:
    p = beton.with_suffix(".json")
    return json.loads(p.read_text()) if p.is_file() else {}


def method(kind: str, percent: float, beton: str | Path) -> str:
    """``auto``: SimCLR's list where it is the published protocol (an ImageNet-1k train split: 1000 WordNet-id
    classes) at 1 or 10 %, else ``balanced``. An ImageNet .beton converted before the converter listed its files
    still gets ``simclr``, which then asks for a reconversion: never a silent switch to another protocol."""
    if kind != "auto":
        return kind
    classes = _summary(Path(beton)).get("classes") or []
    imagenet = len(classes) == 1000 and all(WNID.fullmatch(c) for c in classes)
    return "simclr" if percent in SPLITS and imagenet else "balanced"


def choose(kind: str, percent: float, seed: int, beton: str | Path, dataset: str | None) -> dict:
    """The subset record: method, percent, seed, dataset, the train .beton and its indices (ascending)."""
    beton = Path(beton)
    labels = read_labels(beton)
    how = method(kind, percent, beton)
    record = {"dataset": dataset, "method": how, "percent": percent, "seed": seed, "train": str(beton),
              "train_images": int(len(labels))}
    if how == "simclr":
        name, sha = SPLITS.get(percent, (None, None))
        files = files_of(beton)
        if files is None:
            raise BadInput(f"{beton}: no file list beside it ({beton.with_suffix('.files.txt').name}: the converter "
                           "writes one for class folders since the fine-tune stage); reconvert the train split")
        if len(files) != len(labels):
            raise BadInput(f"{beton.with_suffix('.files.txt')}: lists {len(files)} files for {len(labels)} images; "
                           "reconvert the train split")
        classes = _summary(beton).get("classes") or sorted({f.split("/")[0] for f in files})
        indices, other = simclr_indices(read_split(percent), files, classes, str(SPLITS_DIR / (name or "?")))
        record.update(seed=None, source={"file": name, "sha256": sha, "upstream": UPSTREAM},
                      listed_other_classes=other)
    else:
        indices = balanced_indices(labels, percent, seed)
    counts = np.bincount(labels[indices])
    counts = counts[counts > 0]
    record.update(images=len(indices), per_class_min=int(counts.min()), per_class_max=int(counts.max()),
                  indices=indices)
    return record


def subset_path(out: str | Path) -> Path:
    """The subset file of the fine-tune writing ``out``: beside it (barlow.layout)."""
    return Path(layout.finetune_subset(str(out)))
