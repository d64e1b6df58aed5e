"""Smoke mode: the ImageNet presets' real code path (class folder -> write_mode proportion -> decode
rrc -> ResNet-50 at 224 px with the 8192-d projector -> as-trained loss / accumulation -> published
two-pass or single-pass probes with eval resize 256 -> table) through Snakemake, on a tiny class
folder of odd image modes, on this CPU."""
from __future__ import annotations

import json
import time

import pandas as pd
import pytest
import yaml

from barlow.config import SMOKE_BATCH, SMOKE_STEPS, resolve, smoke
from tests.conftest import write_odd_image_folder
from tests.test_workflow import jobs_run, snakemake, weights_dir

IMAGENET = ["imagenet_r50_ep300_accu4"]  # (the docstring below says why one preset)


def test_smoke_keeps_shapes_and_semantics_and_shrinks_the_work():
    full = resolve("imagenet_r50_ep300_accu4")
    s = smoke(full)
    assert s["model"] == full["model"] and s["data"] == full["data"]
    for key in ("loss", "optimizer", "lars", "schedule", "precision", "decode", "accumulation", "augment", "lr"):
        assert s["pretrain"][key] == full["pretrain"][key], key
    # the recipe's 8 loss groups are kept: 2048 / 256 = 8 = 16 / 2
    assert s["pretrain"]["batch_size"] // s["pretrain"]["loss_group"] == 2048 // 256 == SMOKE_BATCH // 2
    assert s["pretrain"]["max_steps"] == SMOKE_STEPS and s["pretrain"]["checkpoint_every_steps"] == SMOKE_STEPS
    assert [p["name"] for p in s["probe"]["passes"]] == ["five_feature", "avgpool"]
    assert all(p["epochs"] == 1 for p in s["probe"]["passes"]) and s["description"].startswith("SMOKE")
    assert s["probe"]["pooling"] == "published" and s["probe"]["passes"][0]["eval_resize"] == 256


@pytest.mark.slow
def test_imagenet_presets_run_in_smoke_mode_through_snakemake(tmp_path):
    """Every ImageNet-shape code path in one Snakemake run: ResNet-50 at 224 px with the 8192-d projector
    pretrained with the as-trained loss groups and gradient caching (imagenet_r50_ep300_accu4: the base
    preset plus accumulation, so the base's path is inside it) and probed with the published two-pass
    protocol, and a released ResNet-50 probed as downloaded (fc removed: the official release's layout)
    with the single-pass protocol (imagenet_r50_ep300_fastprobe's), which schedules no pretraining. The base
    and _fastprobe presets themselves add no code path: one R50 pretraining and three probe jobs instead of
    two and six (issue 24); _fastprobe sharing the base's weights is checked below without a run."""
    import hashlib

    import torch
    import torchvision

    data = write_odd_image_folder(tmp_path / "imagenet")
    released = tmp_path / "downloads" / "resnet50.pth"
    released.parent.mkdir()
    net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    torch.save(net.state_dict(), released)
    cfg = {
        "results": "results",
        "datasets": {"imagenet": {"kind": "image_folder", "path": str(data), "write_mode": "proportion",
                                  "max_resolution": 500, "jpeg_quality": 90, "compress_probability": 0.5,
                                  "workers": 2}},   # no image_size: the presets' 224 must survive
        "experiments": {**{name: {"dataset": "imagenet", "preset": name} for name in IMAGENET},
                        "bt_official": {"dataset": "imagenet", "preset": "imagenet_r50_ep300_fastprobe", "overrides": {
                            "pretrain": {"init": "checkpoint", "checkpoint": {"path": str(released)}}}}},
        "launcher": {"executor": "local", "pretrain": {"cpus_per_task": 2}, "probe": {"cpus_per_task": 2}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    r = snakemake(tmp_path, "--config", "smoke=true", timeout=1200)
    took = time.time() - t0
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"smoke run of {len(IMAGENET)} ImageNet preset and a released ResNet-50: {took:.0f} s")
    res = tmp_path / "results" / "smoke"
    # one probe job per pass: published = five_feature + avgpool, single_pass = 1 (the released model, which
    # pretrains nothing)
    assert sorted(jobs_run(r.stderr)) == sorted(["convert"] * 2 + ["pretrain"] + ["probe"] * 3
                                                + ["merge_probes"] * 2 + ["report", "all"])
    single = json.loads((res / "imagenet" / "bt_official" / "probes.json").read_text())
    assert single["protocol"] == "single_pass" and sorted(single["passes"]) == ["all_heads"]
    table = pd.read_csv(res / "benchmark.csv")
    assert sorted(table["config"]) == sorted(IMAGENET + ["bt_official"])
    probes = json.loads((res / "imagenet" / "bt_official" / "probes.json").read_text())
    assert probes["backbone_format"] == "official" and probes["init"] == "checkpoint"
    assert probes["backbone_sha256"] == hashlib.sha256(released.read_bytes()).hexdigest()
    md = (res / "benchmark.md").read_text()
    assert "| Released: bt_official |" in md and probes["backbone_sha256"] in md
    # the published row (MMSelfSup 0.x's README, tests/test_published.py) and Δ per cell under each ImageNet row
    lines = md.splitlines()
    row = lines.index(next(line for line in lines if line.startswith("| imagenet_r50_ep300_accu4 |")))
    assert lines[row + 1] == "| Published (MMSelfSup 0.x) | 15.51 | 33.98 | 45.96 | 61.90 | 71.01 | 71.66 | 63.8 |"
    ours = json.loads((res / "imagenet" / "imagenet_r50_ep300_accu4" / "probes.json").read_text())["top1"]
    want = [f"{ours[h] - p:+.2f}".replace("-", "\u2212") for h, p in
            zip(["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"],
                [15.51, 33.98, 45.96, 61.90, 71.01, 71.66])]
    assert lines[row + 2].startswith("| Δ | " + " | ".join(want) + " | "), lines[row + 2]
    assert "imagenet_r50_ep300_accu4 vs published: SMOKE run: its Δ compares a few steps" in md
    assert f"SMOKE run ({SMOKE_STEPS} pretraining steps: checks the code path, not a result)" in md
    assert probes["identity"]["smoke"] is True
    assert list(table.loc[table["config"] == "bt_official", "backbone_format"]) == ["official"]
    for name in IMAGENET:
        probes = json.loads((res / "imagenet" / name / "probes.json").read_text())
        assert set(probes["top1"]) == {"feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"}
        assert probes["dims"] == {"feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216,
                                  "feature5": 8192, "avgpool": 2048}  # ResNet-50 at 224 px, published pooling
        assert probes["config"]["data"]["image_size"] == 224
        metrics = pd.read_csv(weights_dir(tmp_path, name, True) / "metrics.csv")
        assert list(metrics["step"]) == list(range(1, SMOKE_STEPS + 1))
        blob = torch.load(weights_dir(tmp_path, name, True) / "backbone.pth", weights_only=False, map_location="cpu")
        p = blob["config"]["pretrain"]
        assert (p["accumulation"], p["loss"], blob["steps"]) == (4, "as_trained", SMOKE_STEPS)  # gradient caching ran
    assert not (tmp_path / "results" / "imagenet").exists()  # never beside a real run's outputs


def test_fastprobe_pretrains_nothing_of_its_own():
    """imagenet_r50_ep300_fastprobe differs from the base in its probe only: the workflow gives both one weights
    folder (one pretraining), in smoke mode and out of it."""
    from barlow import config

    wf = config.validate_workflow({
        "results": "results",
        "datasets": {"imagenet": {"kind": "image_folder", "path": "/data/imagenet"}},
        "experiments": {n: {"dataset": "imagenet", "preset": n}
                        for n in ("imagenet_r50_ep300", "imagenet_r50_ep300_fastprobe", "imagenet_r50_ep300_accu4")}})
    for smoke_mode in (False, True):
        folders = config.weights_folders("results", config.experiments(wf, smoke_mode))
        dirs = {k: folders[k].dir for k in ("imagenet_r50_ep300", "imagenet_r50_ep300_fastprobe", "imagenet_r50_ep300_accu4")}
        assert dirs["imagenet_r50_ep300_fastprobe"] == dirs["imagenet_r50_ep300"] != dirs["imagenet_r50_ep300_accu4"]
