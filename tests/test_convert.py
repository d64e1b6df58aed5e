"""Conversion to .beton on real data, and every bad input stopping with one line that names it."""
from __future__ import annotations

import gzip
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from barlow.convert import FashionMNIST, convert
from barlow.errors import BadInput
from barlow.loader import beton_length, make_loader
from tests.conftest import FMNIST, cli_in_process, write_image_folder


def _read_all(path, n):
    loader = make_loader(path, batch_size=n, train=False, workers=1, drop_last=False)
    it = iter(loader)
    try:
        (img, label) = next(it)[:2]
        return img.clone(), label.clone()
    finally:
        it.close()


def test_fashion_mnist_roundtrip_is_bit_exact(fmnist_tiny):
    img, label = _read_all(fmnist_tiny["val"], 256)
    src = FashionMNIST(FMNIST, "val", 32)
    assert img.shape == (256, 3, 32, 32) and beton_length(fmnist_tiny["val"]) == 256
    for i in (0, 17, 255):
        expected, y = src[i]
        assert np.array_equal(img[i].permute(1, 2, 0).numpy(), expected)
        assert int(label[i]) == y
    # 28 px padded by 2 on each side: the border is black
    assert img[:, :, :2].max() == 0 and img[:, :, -2:].max() == 0


def test_image_folder_converts_odd_modes_to_the_pixels_pil_gives(tmp_path):
    """Every odd mode read back from the .beton equals PIL's own conversion to RGB; 16-bit grey,
    which PIL would clip at 255, is rescaled (hand-computed values)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    rgb = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    images = {
        "a_grey.png": Image.fromarray(rgb[..., 0], "L"),
        "b_cmyk.tif": Image.fromarray(rgb).convert("CMYK"),
        "c_palette.png": Image.fromarray(rgb).convert("P"),
        "d_rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"),
    }
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for name, im in images.items():
                im.save(d / name)
    deep = np.array([[0, 257, 32896, 65535] * 5] * 20, np.uint16)  # 16-bit grey -> 0, 1, 128, 255
    Image.fromarray(deep).save(root / "train" / "cat" / "e_deep.png")
    summary = convert("image_folder", str(root), "train", tmp_path / "train.beton", workers=1)
    assert summary["images"] == 9 and summary["classes"] == ["cat", "dog"]
    got, labels = _read_all(tmp_path / "train.beton", 9)
    expected = [np.asarray(Image.open(root / "train" / "cat" / n).convert("RGB")) for n in images]
    expected.append(np.repeat(np.array([[0, 1, 128, 255] * 5] * 20, np.uint8)[..., None], 3, axis=2))
    expected += [np.asarray(Image.open(root / "train" / "dog" / n).convert("RGB")) for n in images]
    for i, want in enumerate(expected):
        assert np.array_equal(got[i].permute(1, 2, 0).numpy(), want), i
    assert labels.tolist() == [0] * 5 + [1] * 4


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "not_an_image"])
def test_bad_image_names_the_file_and_writes_nothing(tmp_path, damage):
    root = write_image_folder(tmp_path / "ds", per_class=3)
    bad = root / "train" / "dog" / "1.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif damage == "zero_bytes":
        bad.write_bytes(b"")
    else:
        bad.write_text("this is a text file with an image extension\n")
    out = tmp_path / "train.beton"
    out.write_bytes(b"previous good file")
    with pytest.raises(BadInput, match=r"1\.png: unreadable image"):
        convert("image_folder", str(root), "train", out, workers=1)
    assert out.read_bytes() == b"previous good file"  # nothing already written is damaged
    assert not list(tmp_path.glob(".train.beton.*.tmp"))


def test_non_image_files_are_ignored_like_torchvision(tmp_path):
    root = write_image_folder(tmp_path / "ds", per_class=2)
    (root / "train" / "cat" / "README.txt").write_text("notes")
    assert convert("image_folder", str(root), "train", tmp_path / "t.beton", workers=1)["images"] == 4


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"no such directory"),
    ("empty_root", r"holds no class folders"),
    ("empty_class", r"dog: class folder holds no images"),
    ("unknown_kind", r"dataset kind 'cifar': unknown"),
])
def test_bad_dataset_paths(tmp_path, case, pattern):
    root = tmp_path / "ds"
    kind = "image_folder"
    if case == "empty_root":
        (root / "train").mkdir(parents=True)
    elif case == "empty_class":
        write_image_folder(root, per_class=1)
        for f in (root / "train" / "dog").iterdir():
            f.unlink()
    elif case == "unknown_kind":
        kind = "cifar"
    with pytest.raises(BadInput, match=pattern):
        convert(kind, str(root), "train", tmp_path / "x.beton", workers=1)


def test_val_classes_must_match_train(tmp_path):
    root = write_image_folder(tmp_path / "ds", per_class=1)
    shutil.rmtree(root / "val" / "dog")
    write_image_folder(tmp_path / "other", classes=("cow",), per_class=1)
    shutil.move(tmp_path / "other" / "val" / "cow", root / "val" / "cow")
    with pytest.raises(BadInput, match=r"class folders differ from the train split"):
        convert("image_folder", str(root), "val", tmp_path / "v.beton", workers=1, classes=["cat", "dog"])


def test_truncated_idx_file(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FMNIST / name, tmp_path / name)
    raw = gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(BadInput, match=r"t10k-images-idx3-ubyte.gz: holds .* the file is truncated"):
        FashionMNIST(tmp_path, "val")


def test_truncated_beton_is_reported(fmnist_tiny, tmp_path):
    bad = tmp_path / "cut.beton"
    bad.write_bytes(fmnist_tiny["val"].read_bytes()[:1000])
    with pytest.raises(BadInput, match=r"cut.beton: not a readable .beton"):
        beton_length(bad)


def test_cli_prints_one_line_and_exit_status_2(tmp_path):
    r = cli_in_process("convert", "--kind", "fashion_mnist", "--path", tmp_path / "nope", "--split", "train",
                "--out", tmp_path / "x.beton")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0] and "dataset-fashion-mnist" in lines[0]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk, not a mock (needs root, as `make test` runs)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_conversion_stops_before_writing(tiny_disk):
    with pytest.raises(BadInput, match=r"fashion-mnist \(train\): disk full for .*train.beton") as e:
        convert("fashion_mnist", str(FMNIST), "train", tiny_disk / "train.beton", limit=2000, workers=1)
    assert not list(tiny_disk.iterdir())
    _assert_needs_between(e, 2000 * 32 * 32 * 3, 2)  # raw 32 x 32 RGB pixels, hand-computed


def test_disk_full_image_folder_stops_before_writing(tiny_disk, tmp_path):
    # 2 x 20 noise images of 160 x 120: 57.6 kB raw each, ~2.3 MB in all (hand-computed) > the 1 MiB disk
    root = write_image_folder(tmp_path / "imgs", per_class=20, size=(160, 120))
    with pytest.raises(BadInput, match=r"imgs \(train\): disk full for .*train.beton") as e:
        convert("image_folder", str(root), "train", tiny_disk / "train.beton", workers=1)
    assert not list(tiny_disk.iterdir())
    _assert_needs_between(e, 40 * 160 * 120 * 3, 2)


def _assert_needs_between(excinfo, raw_bytes: int, factor: float) -> None:
    """The message's "needs about N MB" is at least the raw pixels and at most ``factor`` times them."""
    import re

    needs = float(re.search(r"needs about (\d+) MB", str(excinfo.value)).group(1))
    assert raw_bytes / 2**20 - 0.5 <= needs <= factor * raw_bytes / 2**20 + 1, (needs, raw_bytes)


@pytest.mark.timeout(120)  # a writer left waiting forever fails here, naming this test (no wall-clock assert)
def test_disk_filling_up_while_writing_stops_the_writer(tiny_disk, tmp_path, monkeypatch):
    """The estimate misses (another writer took the space): FFCV's worker dies on the full disk, and
    instead of waiting forever the conversion stops with one line and leaves nothing behind."""
    from barlow import diskwatch

    root = write_image_folder(tmp_path / "imgs", per_class=20, size=(160, 120))
    monkeypatch.setattr(diskwatch, "estimate", lambda *a: 0)
    with pytest.raises(BadInput, match=r"imgs \(train\): disk full while writing .*train.beton"):
        convert("image_folder", str(root), "train", tiny_disk / "train.beton", workers=2)
    assert not list(tiny_disk.iterdir())


def test_disk_full_while_saving_keeps_previous_checkpoint(tiny_disk):
    import torch

    from barlow.atomic import save_torch

    target = tiny_disk / "checkpoint.pt"
    save_torch({"step": 1, "w": torch.zeros(1000)}, target)
    with pytest.raises(BadInput, match=r"checkpoint.pt: disk full .* the previous version is kept"):
        save_torch({"step": 2, "w": torch.zeros(1_000_000)}, target)
    assert torch.load(target)["step"] == 1
    assert [p.name for p in tiny_disk.iterdir()] == ["checkpoint.pt"]
