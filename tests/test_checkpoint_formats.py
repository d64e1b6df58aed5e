"""Probing a published checkpoint (``pretrain.init: checkpoint``): every format gives the same probes as
our own backbone.pth, files are loaded with weights_only, and bad files stop with one line."""
from __future__ import annotations

import collections
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from barlow.config import resolve
from barlow.errors import BadInput
from barlow.identity import weights_config
from barlow.weights import backbone_keys, check_backbone, guess_format, load_weights
from tests.conftest import run_cli

PROBE = {"passes": [{"name": "all_heads", "cached": True, "epochs": 2, "batch_size": 128, "optimizer": "adamw",
                     "lr": 0.001, "heads": ["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"]}]}


def _cfg(fmt: str | None = None, path: str = "unused.pth", **over) -> dict:
    pre = {"init": "random"} if fmt is None else {"init": "checkpoint", "checkpoint": {"path": path, "format": fmt}}
    return resolve("fmnist_r18", {"pretrain": pre, "probe": PROBE, **over})


def _as_format(sd: dict, fmt: str, arch: str = "resnet18"):
    """``sd`` (torchvision backbone names, no fc) laid out as ``fmt`` saves it."""
    sd = collections.OrderedDict(sd)
    if fmt == "official":  # main.py: torch.save(model.module.backbone.state_dict(), 'resnet50.pth'), fc = Identity
        return sd
    if fmt == "torchvision":  # a classifier: the same names plus fc
        width = 512 if arch in ("resnet18", "resnet34") else 2048
        return collections.OrderedDict({**sd, "fc.weight": torch.zeros(1000, width), "fc.bias": torch.zeros(1000)})
    if fmt == "mmselfsup":  # mmcv save_checkpoint: backbone + neck + head, and a meta dict
        state = collections.OrderedDict({f"backbone.{k}": v for k, v in sd.items()})
        state.update({"neck.fc0.weight": torch.zeros(16, 8), "neck.bn0.running_mean": torch.zeros(16),
                      "head.bn.running_var": torch.ones(16)})
        meta = {"epoch": 300, "iter": 187800, "mmcv_version": "1.5.0", "time": "Tue Apr 19 10:00:00 2022",
                "seed": 0, "exp_name": "barlowtwins_resnet50_8xb256-coslr-300e_in1k.py",
                "config": "model = dict(type='BarlowTwins')", "env_info": "sys.platform: linux",
                "hook_msgs": {"last_ckpt": "work_dirs/epoch_300.pth"}, "lr": np.float64(0.0016)}
        return {"meta": meta, "state_dict": state}
    if fmt == "ddp":  # a whole DDP-wrapped model (module.backbone.*, module.projector.*)
        state = collections.OrderedDict({f"module.backbone.{k}": v for k, v in sd.items()})
        state["module.projector.0.weight"] = torch.zeros(16, 8)
        return state
    raise ValueError(fmt)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Our backbone.pth of a random ResNet-18 and the same weights in every published layout."""
    from barlow.pretrain import pretrain

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    pretrain(_cfg(), "unused.beton", d / "backbone.pth")  # init random: writes backbone.pth, trains nothing
    sd = torch.load(d / "backbone.pth", weights_only=True)["state_dict"]
    files = {"barlow": d / "backbone.pth"}
    for fmt in ("official", "torchvision", "mmselfsup", "ddp"):
        files[fmt] = d / f"{fmt}.pth"
        torch.save(_as_format(sd, fmt), files[fmt])
    return files


def test_every_format_gives_the_native_probes(native, fmnist_tiny, tmp_path):
    from barlow.probe import run_probes

    t0 = time.time()
    ref = run_probes(_cfg(), native["barlow"], fmnist_tiny["train"], fmnist_tiny["val"], tmp_path / "native.json")
    assert ref["backbone_format"] == "barlow" and len(ref["backbone_sha256"]) == 64
    for fmt in ("official", "mmselfsup", "torchvision"):  # format: auto (explicit formats: the next test)
        res = run_probes(_cfg("auto", str(native[fmt])), native[fmt], fmnist_tiny["train"], fmnist_tiny["val"],
                         tmp_path / f"{fmt}.json")
        assert res["top1"] == ref["top1"], fmt
        assert res["backbone_format"] == fmt and res["init"] == "checkpoint"
        assert res["backbone_sha256"] == hashlib.sha256(native[fmt].read_bytes()).hexdigest()
    print(f"4 probe runs: {time.time() - t0:.1f} s")


def test_every_format_given_or_guessed_loads_the_same_backbone(native):
    ref = load_weights(native["barlow"], "resnet18")
    assert ref.format == "barlow" and ref.info["epochs"] == 0
    cases = [(f, g) for f in ("official", "mmselfsup", "torchvision") for g in ("auto", f)]
    cases.append(("ddp", "official"))  # module.backbone.* kept, module.projector.* dropped
    for fmt, given in cases:
        got = load_weights(native[fmt], "resnet18", given)
        assert got.state_dict.keys() == ref.state_dict.keys(), (fmt, given)
        assert all(torch.equal(got.state_dict[k], v) for k, v in ref.state_dict.items()), (fmt, given)


def test_resnet50_layouts_on_the_meta_device():
    """mmcls/MMSelfSup ResNet-50 names its modules as torchvision does (conv1, bn1, layerN.i.convK/bnK,
    downsample.0/.1): every published layout maps onto our ResNet-50 backbone, shape for shape."""
    import torchvision

    with torch.device("meta"):
        r50 = torchvision.models.resnet50().state_dict()
        r18 = torchvision.models.resnet18().state_dict()
    bare = {k: v for k, v in r50.items() if not k.startswith("fc.")}
    for fmt in ("official", "torchvision", "mmselfsup"):
        obj = _as_format(bare, fmt, "resnet50")
        assert guess_format(obj) == fmt
        sd = backbone_keys(obj["state_dict"] if fmt == "mmselfsup" else obj)
        check_backbone(sd, "resnet50", fmt)
        assert "layer1.0.downsample.1.running_mean" in sd and "layer4.2.bn3.weight" in sd
    with pytest.raises(BadInput, match=r"'layer1\.0\.conv1\.weight' has shape \[64, 64, 3, 3\], a resnet50 "
                                       r"backbone needs \[64, 64, 1, 1\]"):
        check_backbone(backbone_keys({k: v for k, v in r18.items()}), "resnet50", "r18.pth")
    with pytest.raises(BadInput, match=r"has no tensor 'conv1.weight'"):
        check_backbone({}, "resnet50", "empty.pth")


def _touch(path: str) -> None:
    Path(path).write_text("this ran while unpickling")


class _Evil:
    """A pickle that runs code when loaded: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_a_pickle_that_runs_code_is_refused_without_running_it(native, tmp_path):
    marker = tmp_path / "pwned"
    sd = torch.load(native["official"], weights_only=True)
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in sd.items()}, "meta": {"x": _Evil(marker)}}, evil)
    refused = r"refused: loading it needs tests\.test_checkpoint_formats\._touch, .*trust_checkpoint: true"
    with pytest.raises(BadInput, match=refused):
        load_weights(evil, "resnet18")
    assert not marker.exists()
    # the escape hatch: trust_checkpoint loads it with weights_only=False (and so runs it)
    assert load_weights(evil, "resnet18", trust=True).format == "mmselfsup"
    assert marker.exists()


@pytest.mark.parametrize("case", ["evil", "truncated", "r18_for_r50"])
def test_bad_files_stop_the_probe_cli_with_one_line(case, native, fmnist_tiny, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / f"{case}.pth"
    over = {"pretrain": {"init": "checkpoint", "checkpoint": {"path": str(path)}}, "probe": PROBE}
    if case == "evil":
        torch.save({"weights": torch.ones(2), "x": _Evil(marker)}, path)
        expect = "refused: loading it needs"
    elif case == "truncated":
        blob = native["official"].read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
        expect = "damaged, truncated or not a PyTorch weights file"
    else:
        path.write_bytes(native["official"].read_bytes())
        over["model"] = {"arch": "resnet50"}
        expect = "(format official, guessed): tensor 'layer1.0.conv1.weight' has shape"
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(over))
    r = run_cli("probe", "--preset", "fmnist_r18", "--config", tmp_path / "over.yaml", "--backbone", path,
                "--train", fmnist_tiny["train"], "--val", fmnist_tiny["val"], "--out", tmp_path / "p.json")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert expect in lines[0] and str(path) in lines[0]
    assert not marker.exists() and not (tmp_path / "p.json").exists()


def test_schema_and_identity_of_init_checkpoint():
    with pytest.raises(BadInput, match=r"exp\.pretrain: 'checkpoint' is a required property"):
        resolve("fmnist_r18", {"pretrain": {"init": "checkpoint"}}, where="exp")
    with pytest.raises(BadInput, match=r"exp\.pretrain\.checkpoint: given, but pretrain\.init is 'barlow_twins'"):
        resolve("fmnist_r18", {"pretrain": {"checkpoint": {"path": "x.pth"}}}, where="exp")
    with pytest.raises(BadInput, match=r"exp\.pretrain\.checkpoint\.path: missing"):
        resolve("fmnist_r18", {"pretrain": {"init": "checkpoint", "checkpoint": {"format": "official"}}}, where="exp")
    with pytest.raises(BadInput, match=r"exp\.pretrain\.checkpoint\.format: 'mmcls' is not one of"):
        resolve("fmnist_r18", {"pretrain": {"init": "checkpoint", "checkpoint": {"path": "x", "format": "mmcls"}}},
                where="exp")
    cfg = _cfg("official", "/data/a/resnet50.pth")
    moved = _cfg("official", "/data/b/resnet50.pth")
    assert weights_config(cfg) == weights_config(moved)  # the path is the probe's input file, not its config
    assert weights_config(cfg)["pretrain"]["checkpoint"] == {"format": "official", "trust_checkpoint": False}  # (the schema default)


def test_estimate_skips_pretraining_for_a_released_checkpoint():
    from barlow.estimate import estimate

    cfg = resolve("imagenet_r50_ep300", {"pretrain": {"init": "checkpoint", "checkpoint": {"path": "r50.pth"}}})
    rows = {r["stage"]: r for r in estimate(cfg)}
    full = {r["stage"]: r for r in estimate(resolve("imagenet_r50_ep300"))}
    assert rows["pretrain"]["gpu_hours"] == 0 and rows["pretrain"]["steps"] == 0
    assert rows["probe:five_feature"]["gpu_hours"] == full["probe:five_feature"]["gpu_hours"] > 0
    assert rows["total"]["gpu_hours"] == pytest.approx(full["total"]["gpu_hours"] - full["pretrain"]["gpu_hours"])


def test_report_row_names_the_released_model(native, tmp_path):
    from barlow.report import report

    runs = []
    for name, init, fmt in (("bt", "barlow_twins", "barlow"), ("official_r18", "checkpoint", "official")):
        d = tmp_path / "fmnist" / name
        d.mkdir(parents=True)
        blob = {"top1": {"feature5": 70.0, "avgpool": 71.0}, "protocol": "fast", "init": init,
                "config": {"model": {"arch": "resnet18"}}, "pretrain_epochs": 2 if fmt == "barlow" else None,
                "backbone": str(native[fmt]), "backbone_format": fmt, "backbone_sha256": "ab" * 32,
                "train_images": 384, "val_images": 256,
                "identity": {"dataset": "fmnist", "experiment": name, "seed": None}}
        (d / "probes.json").write_text(json.dumps(blob))
        runs.append(d / "probes.json")
    report(runs, tmp_path / "out")
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| Released: official_r18 |" in md and "| bt |" in md
    assert f"released weights `official.pth` (format official, sha256 {'ab' * 32})" in md
    df = pd.read_csv(tmp_path / "out" / "benchmark.csv")
    assert list(df["backbone_format"]) == ["barlow", "official"] and set(df["backbone_sha256"]) == {"ab" * 32}


def test_snakemake_schedules_no_pretraining_for_a_checkpoint(native, tmp_path):
    """Dry run: the released file is the probe's input; a missing file stops at startup with one line."""
    from tests.test_workflow import snakemake, tiny_config

    cfg = tiny_config()
    cfg["experiments"]["rel"] = {"dataset": "tiny", "preset": "fmnist_r18", "overrides": {
        "pretrain": {"init": "checkpoint", "checkpoint": {"path": str(native["mmselfsup"])}}, "probe": PROBE}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "results/tiny/rel/probes.json", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", r.stdout + r.stderr, flags=re.M))
    assert "pretrain" not in counts and counts.get("probe") == "1" and counts.get("convert") == "2", \
        r.stdout + r.stderr
    cfg["experiments"]["rel"]["overrides"]["pretrain"]["checkpoint"]["path"] = str(tmp_path / "nowhere.pth")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
    assert "config.experiments.rel.overrides.pretrain.checkpoint.path" in lines[0] and "no such file" in lines[0]
