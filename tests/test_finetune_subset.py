"""The fine-tune's labelled subsets: SimCLR's shipped ImageNet lists (hash-checked), their mapping to .beton
indices through the converter's file list, and the seeded class-balanced subset of other datasets."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from barlow import finetune_subset as fs
from barlow.errors import BadInput

# Transcribed from upstream, not from barlow/finetune_subset.py: google-research/simclr, repository HEAD
# 383d4143fd8cf7879ae10f1046a9baeb753ff438 (the files last changed in be133b38fb21abb77403391dc6db3412edfe92f2),
# `git ls-tree HEAD imagenet_subsets/` and `git show HEAD:imagenet_subsets/<file> | sha256sum`.
UPSTREAM = {
    "1percent.txt": {"blob": "a41c9e9f271bf9467ea81e17e279cd9a2ece388b", "lines": 12811,
                     "sha256": "71e82a48ba78252683ae334c4d019ebd5c6e855b9599c1389fbe83eb9549cf17"},
    "10percent.txt": {"blob": "1ca337e2a25273c022a7a955893ae6c2a6cb856c", "lines": 128116,
                      "sha256": "6d09de11e7bdaf5b1f3b1f249b6183695f97310cdd20f0c03e7235b6b9392091"},
}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_shipped_lists_are_simclrs_files_byte_for_byte(name):
    data = (fs.SPLITS_DIR / name).read_bytes()
    want = UPSTREAM[name]
    assert hashlib.sha256(data).hexdigest() == want["sha256"]
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == want["blob"]  # git's id of the upstream file
    percent = 1 if name.startswith("1percent") else 10
    assert fs.SPLITS[percent] == (name, want["sha256"])  # the code checks against the same value
    names = fs.read_split(percent)
    assert len(names) == len(set(names)) == want["lines"]
    assert len({n.split("_")[0] for n in names}) == 1000 and all(n.endswith(".JPEG") for n in names)


def test_a_changed_list_stops_with_one_line_naming_it(tmp_path):
    text = (fs.SPLITS_DIR / "1percent.txt").read_text()
    (tmp_path / "1percent.txt").write_text(text.replace("n01440764", "n01440765", 1))
    with pytest.raises(BadInput, match=r"1percent.txt: sha256 [0-9a-f]{64} is not the shipped 1percent.txt's "
                                       r"71e82a48") as e:
        fs.read_split(1, tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(BadInput, match="lists exist for 1 and 10 only"):
        fs.read_split(5)


def _imagenet_like(root, names_per_class: dict) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls, names in names_per_class.items():
            (root / split / cls).mkdir(parents=True)
            for name in names:
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / split / cls / name)


def test_simclr_names_map_to_the_beton_indices_of_those_files(tmp_path):
    """The converter lists each .beton index's file; a list of names then picks exactly those images."""
    from barlow.convert import convert, files_list_path
    from barlow.loader import make_loader

    names = fs.read_split(1)
    a, b = names[0].split("_")[0], next(n for n in names if not n.startswith(names[0].split("_")[0])).split("_")[0]
    listed = sorted(n for n in names if n.split("_")[0] in (a, b))
    extra = {a: [f"{a}_999990001.JPEG", f"{a}_999990002.JPEG"], b: [f"{b}_999990003.JPEG"]}
    tree = {c: [n for n in listed if n.startswith(c)] + extra[c] for c in (a, b)}
    _imagenet_like(tmp_path / "inet", tree)
    beton = tmp_path / "train.beton"
    summary = convert("image_folder", str(tmp_path / "inet"), "train", beton, workers=1)
    (tmp_path / "train.json").write_text(json.dumps(summary))
    files = files_list_path(beton).read_text().splitlines()
    assert summary["files"] == "train.files.txt"
    assert files == [f"{c}/{n}" for c in sorted(tree) for n in sorted(tree[c])]  # torchvision's order
    want = sorted(files.index(f"{n.split('_')[0]}/{n}") for n in listed)
    idx, other = fs.simclr_indices(names, files, [a, b], "1percent.txt")
    assert idx == want and other == len(names) - len(listed)
    record = fs.choose("simclr", 1, 0, beton, "inet")
    assert record["indices"] == want and record["method"] == "simclr" and record["listed_other_classes"] == other
    assert record["source"]["sha256"] == UPSTREAM["1percent.txt"]["sha256"]
    loader = make_loader(beton, len(files), train=False, workers=1, drop_last=False)
    it = iter(loader)
    try:
        images, labels = next(it)[:2]
    finally:
        it.close()
    from PIL import Image

    for i in want[:3] + want[-2:]:
        cls, name = files[i].split("/")
        assert int(labels[i]) == sorted(tree).index(cls)
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), np.asarray(Image.open(tmp_path / "inet/train" / cls / name)))
    # a listed image the folder lacks: one line naming it
    missing = listed[1]
    (tmp_path / "inet/train" / a / missing).unlink()
    convert("image_folder", str(tmp_path / "inet"), "train", beton, workers=1)
    with pytest.raises(BadInput, match=rf"1percent.txt: lists {missing} \(train/{a}/{missing}\), which the train "
                                       r"\.beton does not hold \(1 listed image\(s\) missing\)") as e:
        fs.choose("simclr", 1, 0, beton, "inet")
    assert "\n" not in str(e.value)


def test_auto_takes_simclrs_list_for_imagenet_1k_folders_only(tmp_path):
    from barlow.convert import files_list_path

    beton = tmp_path / "train.beton"
    wnids = [f"n{i:08d}" for i in range(1000)]
    (tmp_path / "train.json").write_text(json.dumps({"classes": wnids}))
    files_list_path(beton).write_text("n00000000/n00000000_1.JPEG\n")
    assert fs.method("auto", 1, beton) == fs.method("auto", 10, beton) == "simclr"
    assert fs.method("auto", 5, beton) == "balanced" and fs.method("balanced", 1, beton) == "balanced"
    (tmp_path / "train.json").write_text(json.dumps({"classes": wnids[:100]}))  # ImageNet-100
    assert fs.method("auto", 1, beton) == "balanced" and fs.method("simclr", 1, beton) == "simclr"


def test_an_imagenet_beton_without_a_file_list_asks_for_reconversion(tmp_path, monkeypatch):
    """Converted before the converter listed files: SimCLR's protocol still applies, so it stops instead of
    quietly fine-tuning on a balanced subset."""
    beton = tmp_path / "train.beton"
    (tmp_path / "train.json").write_text(json.dumps({"classes": [f"n{i:08d}" for i in range(1000)]}))
    monkeypatch.setattr(fs, "read_labels", lambda b: np.arange(2000) % 1000)
    with pytest.raises(BadInput, match=r"train.beton: no file list beside it \(train.files.txt.*reconvert the train"):
        fs.choose("auto", 10, 0, beton, "imagenet")


def test_balanced_subset_has_equal_classes_and_follows_its_seed():
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate([120, 95, 300, 101, 99])])[rng.permutation(715)]
    idx = fs.balanced_indices(labels, 10, seed=3)  # round(71.5) = 72 = 5 x 14 + 2
    counts = np.bincount(labels[idx])
    assert len(idx) == len(set(idx)) == 72 and sorted(counts) == [14, 14, 14, 15, 15] and idx == sorted(idx)
    assert fs.balanced_indices(labels, 10, seed=3) == idx != fs.balanced_indices(labels, 10, seed=4)
    assert np.bincount(labels[fs.balanced_indices(labels, 0.1, seed=0)]).tolist() == [1] * 5  # one a class at least
    with pytest.raises(BadInput, match=r"finetune percent 90: class 0 has 120 train image\(s\), fewer than its share "
                                       r"of 128"):
        fs.balanced_indices(labels, 90, seed=0)  # round(643.5) = 644 = 5 x 128 + 4
    # 3 + 3 + 4 images: 40 % = 4 = 3 x 1 + 1, the extra one from a class with an image to spare, whatever the seed
    small = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    assert all(np.bincount(small[fs.balanced_indices(small, 40, s)]).tolist() in ([2, 1, 1], [1, 2, 1], [1, 1, 2])
               for s in range(20))
    assert len(fs.balanced_indices(np.array([0, 1, 1, 2, 2]), 80, 0)) == 4  # 4 = 3 x 1 + 1: class 0 gives no extra
    with pytest.raises(BadInput, match=r"2 classes must give 2 images, only 1 have that many"):
        fs.balanced_indices(np.array([0, 1, 2, 2, 2]), 100, 0)  # 5 = 3 x 1 + 2, but only class 2 has a second


def test_balanced_subset_of_a_beton_is_recorded(fmnist_tiny):
    record = fs.choose("auto", 10, 7, fmnist_tiny["train"], "fmnist")
    labels = fs.read_labels(fmnist_tiny["train"])
    assert len(labels) == record["train_images"] == 384
    assert {k: record[k] for k in ("dataset", "method", "percent", "seed", "images")} == \
        {"dataset": "fmnist", "method": "balanced", "percent": 10, "seed": 7, "images": 38}
    assert record["indices"] == fs.balanced_indices(labels, 10, 7)
    assert sorted(np.bincount(labels[record["indices"]]).tolist()) == [3, 3] + [4] * 8
    assert (record["per_class_min"], record["per_class_max"]) == (3, 4)
