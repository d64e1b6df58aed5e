"""CIFAR-10 / CIFAR-100 from the distributed Python-pickle batches, ImageNet-100 as a class list over an
ImageNet folder, and the three OpenMixup presets in smoke mode through Snakemake.

The CIFAR files are written (barlow.synthetic) in the distributed layout and format (cifar-10-batches-py/data_batch_1..5,
test_batch, batches.meta; cifar-100-python/train, test, meta): pickled dicts with bytes keys (what the
archives' Python 2 pickles load as), ``data`` an N x 3072 uint8 array of R, G, B planes, labels as
lists of ints, with only a few images per file.
"""
from __future__ import annotations

import json
import pickle
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from barlow.convert import SUBSETS, convert
from barlow.synthetic import CIFAR10_NAMES, write_pickle, write_cifar10, write_cifar100
from barlow.errors import BadInput
from tests.conftest import cli_in_process, run_cli, write_image_folder, write_odd_image_folder
from barlow import layout
from tests.test_workflow import jobs_run, snakemake, weights_dir

def _read_back(beton: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    from barlow.loader import make_loader, split_batch

    (x,), y = split_batch(next(iter(make_loader(beton, n, train=False, workers=1))), 1)
    return x.permute(0, 2, 3, 1).numpy(), y.numpy()


def test_cifar10_batches_convert_with_their_pixels_and_labels(tmp_path):
    d = write_cifar10(tmp_path / "c10")
    tr = convert("cifar10", str(tmp_path / "c10"), "train", tmp_path / "train.beton", workers=1)  # the parent works too
    va = convert("cifar10", str(d), "val", tmp_path / "val.beton", workers=1)
    assert (tr["images"], va["images"]) == (5 * 16, 40)
    assert tr["classes"] == [n.decode() for n in CIFAR10_NAMES] and tr["label_ids"] == list(range(10))
    x, y = _read_back(tmp_path / "train.beton", 80)
    raw = [pickle.load(open(d / f"data_batch_{k}", "rb"), encoding="bytes") for k in range(1, 6)]
    want = np.concatenate([b[b"data"] for b in raw]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert x.shape == (80, 32, 32, 3) and np.array_equal(x, want)  # R, G, B planes -> HWC, in file order
    assert list(y) == [lab for b in raw for lab in b[b"labels"]]
    x, y = _read_back(tmp_path / "val.beton", 40)
    test = pickle.load(open(d / "test_batch", "rb"), encoding="bytes")
    assert np.array_equal(x, test[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar100_uses_the_fine_labels(tmp_path):
    d = write_cifar100(tmp_path)
    tr = convert("cifar100", str(d), "train", tmp_path / "train.beton", workers=1)
    va = convert("cifar100", str(d), "val", tmp_path / "val.beton", workers=1)
    assert (tr["images"], va["images"], len(tr["classes"])) == (80, 40, 100)
    assert tr["classes"][:2] == ["fine0", "fine1"] and tr["label_ids"] == [0, 7, 42, 58, 99]
    _, y = _read_back(tmp_path / "train.beton", 80)
    assert list(y) == pickle.load(open(d / "train", "rb"), encoding="bytes")[b"fine_labels"]


def _one_line_error(tmp_path, kind, path) -> str:
    r = cli_in_process("convert", "--kind", kind, "--path", path, "--split", "train", "--out", tmp_path / "o" / "t.beton",
                "--workers", "1")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "o" / "t.beton").exists()
    return lines[0]


def test_truncated_batch_stops_with_one_line_naming_the_file(tmp_path):
    d = write_cifar10(tmp_path)
    raw = (d / "data_batch_3").read_bytes()
    (d / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    line = _one_line_error(tmp_path, "cifar10", d)
    assert str(d / "data_batch_3") in line and "truncated" in line and "expected" in line and "labels" in line


def test_cifar100_folder_given_as_cifar10_and_back(tmp_path):
    c100 = write_cifar100(tmp_path / "a")
    line = _one_line_error(tmp_path, "cifar10", c100)
    assert str(c100 / "data_batch_1") in line and "missing" in line and "kind: cifar100" in line
    c10 = write_cifar10(tmp_path / "b")
    line = _one_line_error(tmp_path, "cifar100", c10)
    assert str(c10 / "train") in line and "kind: cifar10" in line
    # a CIFAR-100 batch under a CIFAR-10 name: the keys say what it is
    (c10 / "data_batch_2").write_bytes((c100 / "train").read_bytes())
    line = _one_line_error(tmp_path, "cifar10", c10)
    assert str(c10 / "data_batch_2") in line and "no labels" in line and "cifar100 file" in line


def test_a_foreign_pickle_is_refused_without_running_it(tmp_path):
    d = write_cifar10(tmp_path)

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    write_pickle(d / "data_batch_1", {b"data": Boom()})
    line = _one_line_error(tmp_path, "cifar10", d)
    assert str(d / "data_batch_1") in line and "not a cifar10 batch" in line
    assert not (tmp_path / "ran").exists()
    with pytest.raises(BadInput, match="no such directory"):
        convert("cifar10", str(tmp_path / "nowhere"), "train", tmp_path / "x.beton")


def test_imagenet100_subset_keeps_the_listed_classes_of_a_larger_copy(tmp_path):
    wnids = SUBSETS["imagenet100"].read_text().split()
    extra = ("n00000001", "n99999999")
    root = write_image_folder(tmp_path / "imagenet", classes=(*wnids, *extra), per_class=1, size=(8, 8))
    tr = convert("image_folder", str(root), "train", tmp_path / "train.beton", workers=1, subset="imagenet100")
    assert tr["classes"] == sorted(wnids) and tr["images"] == 100  # label ids: sorted wnids, as torchvision
    va = convert("image_folder", str(root), "val", tmp_path / "val.beton", workers=1, subset="imagenet100",
                 classes=tr["classes"])
    assert va["classes"] == tr["classes"]
    gone = sorted(wnids)[17]
    for f in (root / "val" / gone).iterdir():
        f.unlink()
    (root / "val" / gone).rmdir()
    r = run_cli("convert", "--kind", "image_folder", "--path", root, "--split", "val", "--subset", "imagenet100",
                "--out", tmp_path / "v2.beton", "--workers", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{root / 'val' / gone}: missing class folder (1 of the 100 classes of subset imagenet100" in r.stderr


def test_classes_file(tmp_path):
    root = write_image_folder(tmp_path / "im", classes=("ant", "bee", "cat", "dog"), per_class=2, size=(8, 8))
    lst = tmp_path / "list.txt"
    lst.write_text("# my subset\ndog\nbee  # a comment\n\n")
    tr = convert("image_folder", str(root), "train", tmp_path / "t.beton", workers=1, classes_file=str(lst))
    assert tr["classes"] == ["bee", "dog"] and tr["images"] == 4
    with pytest.raises(BadInput, match="not both"):
        convert("image_folder", str(root), "train", tmp_path / "t2.beton", subset="imagenet100", classes_file=str(lst))
    with pytest.raises(BadInput, match="image_folder only"):
        convert("cifar10", str(root), "train", tmp_path / "t3.beton", classes_file=str(lst))


# cifar10_r18_ep1000 differs from cifar100_r18_ep1000 by its learning rate alone (tests/test_presets_openmixup.py
# checks every preset against OpenMixup's files): its code path is this run's cifar100 one
OPENMIXUP = ["cifar100_r18_ep1000", "imagenet100_r18_ep1000"]


@pytest.mark.slow
def test_openmixup_presets_run_in_smoke_mode_through_snakemake(tmp_path):
    c100 = write_cifar100(tmp_path / "cifar100")
    im = write_odd_image_folder(tmp_path / "imagenet", classes=("ant", "bee", "cat", "dog"), per_class=12)
    (tmp_path / "in100.txt").write_text("ant\ncat\ndog\n")   # the ImageNet-100 list, in miniature
    cfg = {
        "results": "results",
        "datasets": {
            "cifar100": {"kind": "cifar100", "path": str(c100)},
            "imagenet100": {"kind": "image_folder", "path": str(im), "classes_file": str(tmp_path / "in100.txt"),
                            "write_mode": "proportion", "max_resolution": 500},
        },
        # as a new user writes it: no precision override (smoke mode runs the presets' amp_fp16 as `auto` on a CPU)
        "experiments": {name: {"dataset": name.split("_")[0], "preset": name} for name in OPENMIXUP},
        "launcher": {"executor": "local", "pretrain": {"cpus_per_task": 2}, "probe": {"cpus_per_task": 2}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    r = snakemake(tmp_path, "--config", "smoke=true", timeout=1400)
    print(f"smoke run of the {len(OPENMIXUP)} OpenMixup presets: {time.time() - t0:.0f} s")
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(jobs_run(r.stderr)) == sorted(["convert"] * 4 + ["pretrain"] * 2 + ["probe"] * 4
                                                + ["merge_probes"] * 2 + ["report", "all"])
    res = tmp_path / "results" / "smoke"
    assert sorted(pd.read_csv(res / "benchmark.csv")["config"]) == sorted(OPENMIXUP)
    for name in OPENMIXUP:
        ds = name.split("_")[0]
        probes = json.loads((res / ds / name / "probes.json").read_text())
        assert probes["dims"] == {"feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216,
                                  "feature5": 8192, "avgpool": 512}  # ResNet-18 at 224 px, generalised pooling
        assert probes["config"]["data"]["image_size"] == 224 and probes["protocol"] == "openmixup"
        w = weights_dir(tmp_path, name, True)
        assert list(pd.read_csv(w / "metrics.csv")["step"]) == [1, 2]
        log = Path(layout.pretrain_log(str(res), str(w))).read_text()
        assert re.search(r"^precision: amp_fp16 -> (amp_bf16|fp32) on this cpu \(smoke mode: ", log, flags=re.M), log[-2000:]
    summary = json.loads((res / "data" / "imagenet100" / "train.json").read_text())
    assert summary["classes"] == ["ant", "cat", "dog"]
    assert json.loads((res / "data" / "cifar100" / "train.json").read_text())["images"] == 64  # smoke limit
