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


def random_backbone(path, arch="resnet18"):
    """Backbone weights as the pretrain stage writes them for init: random (no training)."""
    from barlow.atomic import save_torch

    torch.manual_seed(0)
    save_torch({"arch": arch, "state_dict": backbone(arch).state_dict(), "epochs": 0, "steps": 0}, path)
    return path


def tiny_cfg(cached: bool, augment: dict | None = None, epochs: int = 1, batch_size: int = 64, **probe) -> dict:
    """fmnist_r18 with a random backbone and one pass training all six heads."""
    aug = {"scale": [0.5, 1.0]} if augment is None else augment
    return resolve("fmnist_r18", {"pretrain": {"init": "random"}, "probe": {**probe, "passes": [
        {"name": "feat", "cached": cached, "heads": ["feature1", "feature2", "feature3", "feature4", "feature5"],
         "epochs": epochs, "batch_size": batch_size, "optimizer": "sgd", "lr": 0.01, "nesterov": True,
         "weight_decay": 1e-4, "milestones": [1], "augment": aug},
        {"name": "avg", "cached": cached, "heads": ["avgpool"], "epochs": epochs, "batch_size": batch_size,
         "optimizer": "adamw", "lr": 0.01, "augment": aug}]}})


class OneDevicePerOp(torch.overrides.TorchFunctionMode):
    """Refuses any op whose tensor operands lie on different devices, as CUDA does.

    Out-of-place ops on ``meta`` already refuse CPU operands, but meta's in-place kernels (``add_``,
    ``+=``) accept them where CUDA's raise. Allowed, as on CUDA: copies between devices, indexing
    with CPU indices, 0-dim CPU tensors (scalars).
    """

    CROSS = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.__getitem__,
             torch.Tensor.__setitem__, torch._has_compatible_shallow_copy_type}  # the last: Module.to

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.CROSS:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            devices = {t.device for t in leaves if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                raise RuntimeError(f"{getattr(func, '__name__', func)}: operands on several devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "augmented"])
def test_probe_moves_every_batch_to_the_heads_device(fmnist_tiny, tmp_path, cached):
    """Compute on the meta device, CPU batches from the loader: any consumer that forgets to move
    its batch to the heads' device mixes devices, which PyTorch refuses (as it would on CUDA)."""
    import math

    from barlow.distributed import Env

    weights = random_backbone(tmp_path / "backbone.pth")
    out = tmp_path / "probes.json"
    with OneDevicePerOp():
        result = run_probes(tiny_cfg(cached), weights, fmnist_tiny["train"], fmnist_tiny["val"], out,
                            env=Env(device="meta"))
    assert set(result["top1"]) == {"feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"}
    assert all(math.isnan(v) for v in result["top1"].values())  # meta tensors hold no numbers
    assert out.is_file() and not (tmp_path / "probes.checkpoint.pt").exists()


def test_cached_features_are_float16_in_host_memory(fmnist_tiny):
    from barlow.distributed import Env
    from barlow.probe import _extract, eval_view
    from barlow.augment import BatchAugment

    probes = Probes(backbone("resnet18"), 32)
    aug = BatchAugment(eval_view(32, {}, (0.5,) * 3, (0.5,) * 3))
    feats, y = _extract(probes, fmnist_tiny["val"], ["feature1", "avgpool"], aug, {"batch_size": 100}, 1, 0,
                        list(range(150)), "cpu", "simple", 32, env=Env())
    assert len(y) == 150 and y.device.type == "cpu"
    for v in feats.values():
        assert v.dtype == torch.float16 and v.device.type == "cpu" and len(v) == 150
