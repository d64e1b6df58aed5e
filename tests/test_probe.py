"""Probe pooling rule, head shapes, and real probe runs (cached and augmented passes) on tiny data."""
import json

import pytest
import torch

from barlow.config import resolve
from barlow.model import backbone
from barlow.probe import Probes, pooling_plan, run_probes


def test_auto_pooling_reproduces_published_sizes_and_never_upsamples():
    auto = pooling_plan([64, 256, 512, 1024, 2048], [112, 56, 28, 14, 8])  # not the exact published maps
    assert [p.output_size for p in auto] == [12, 6, 4, 3, 2]
    small = pooling_plan([64, 64, 128, 256, 512], [16, 8, 4, 2, 1])
    assert [p.output_size for p in small] == [12, 8, 4, 2, 1]


def test_resnet18_32px_dims_and_heads():
    probes = Probes(backbone("resnet18"), 32)
    assert probes.dims() == {"feature1": 9216, "feature2": 4096, "feature3": 2048, "feature4": 1024,
                             "feature5": 512, "avgpool": 512}
    pooled = probes.pooled(torch.randn(3, 3, 32, 32), ["feature1", "avgpool"])
    assert pooled["feature1"].shape == (3, 64, 12, 12) and pooled["avgpool"].shape == (3, 512, 1, 1)
    head = probes.make_head("feature1", 10)
    assert head(pooled["feature1"]).shape == (3, 10)
    assert not any(p.requires_grad for p in probes.net.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False])
def test_probe_run_writes_top1_per_head(fmnist_tiny, tmp_path, cached):
    from barlow.pretrain import pretrain

    cfg = resolve("fmnist_r18", {"pretrain": {"init": "random"}, "probe": {"passes": [
        {"name": "feat", "cached": cached, "heads": ["feature1", "feature2", "feature3", "feature4", "feature5"],
         "epochs": 2, "batch_size": 64, "optimizer": "sgd", "lr": 0.01, "nesterov": True, "weight_decay": 1e-4,
         "milestones": [1], "augment": {"scale": [0.5, 1.0]}},
        {"name": "avg", "cached": cached, "heads": ["avgpool"], "epochs": 2, "batch_size": 64, "optimizer": "sgd",
         "lr": 0.5, "milestones": [1]}]}})
    weights = pretrain(cfg, fmnist_tiny["train"], tmp_path / "backbone.pth")
    out = tmp_path / "probes.json"
    run_probes(cfg, weights, fmnist_tiny["train"], fmnist_tiny["val"], out)
    result = json.loads(out.read_text())
    assert set(result["top1"]) == {"feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"}
    assert all(0 <= v <= 100 for v in result["top1"].values())
    assert result["top1"]["feature1"] > 30  # 10 classes: well above chance from raw-ish stem features
    assert result["val_images"] == 256 and result["init"] == "random" and result["probe_commit"]


def test_val_from_another_dataset_is_refused(tmp_path):
    import shutil

    from barlow.data import convert
    from barlow.errors import BadInput
    from barlow.probe import _num_classes
    from tests.conftest import write_image_folder

    a = write_image_folder(tmp_path / "a", classes=("cat", "dog"), per_class=2)
    b = write_image_folder(tmp_path / "b", classes=("car", "bus"), per_class=2)
    for root, split in ((a, "train"), (b, "val")):
        s = convert("image_folder", str(root), split, tmp_path / f"{split}.beton", workers=1)
        (tmp_path / f"{split}.json").write_text(__import__("json").dumps(s))
    with pytest.raises(BadInput, match=r"val.beton: its classes .* differ from .*train.beton"):
        _num_classes(tmp_path / "train.beton", tmp_path / "val.beton")
    shutil.copy(tmp_path / "train.json", tmp_path / "val.json")
    assert _num_classes(tmp_path / "train.beton", tmp_path / "val.beton") == 2
