"""Probe pooling rule, head shapes, and real probe runs (cached and augmented passes) on tiny data."""
import json

import pytest
import torch

from barlow.config import resolve
from barlow.model import backbone
from barlow.heads import Probes, pooling_plan
from barlow.probe import run_probes
from tests.ranks import run_ranks


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
def test_probe_run_writes_top1_per_head(fmnist_tiny, tmp_path, cached, monkeypatch):
    from barlow.pretrain import pretrain

    cfg = resolve("fmnist_r18", {"pretrain": {"init": "random"}, "probe": {"passes": [
        {"name": "feat", "cached": cached, "heads": ["feature1", "feature2", "feature3", "feature4", "feature5"],
         "epochs": 2, "batch_size": 64, "optimizer": "sgd", "lr": 0.01, "nesterov": True, "weight_decay": 1e-4,
         "milestones": [1], "augment": {"scale": [0.5, 1.0]}},
        {"name": "avg", "cached": cached, "heads": ["avgpool"], "epochs": 2, "batch_size": 64, "optimizer": "sgd",
         "lr": 0.5, "milestones": [1]}]}})
    weights = pretrain(cfg, fmnist_tiny["train"], tmp_path / "backbone.pth")
    out = tmp_path / "probes.json"
    heads = capture_heads(monkeypatch)
    run_probes(cfg, weights, fmnist_tiny["train"], fmnist_tiny["val"], out)
    result = json.loads(out.read_text())
    assert set(result["top1"]) == {"feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"}
    assert result["val_images"] == 256 and result["init"] == "random" and result["probe_commit"]
    # top-1 recomputed from the trained heads' predictions on val features the test computes itself:
    # pooled sides 12, 8, 4, 2, 1 (README: ResNet-18 at 32 px), float16 as the probes keep them
    x_va, y_va = eval_images("val", 256)
    maps = backbone_maps(weights, x_va)
    inputs = [torch.nn.functional.adaptive_avg_pool2d(m, side) for m, side in zip(maps, (12, 8, 4, 2, 1))]
    inputs.append(maps[-1].mean((2, 3), keepdim=True))
    assert len(heads) == 6  # evaluated in pass order: feature1..5, then avgpool
    for name, head, x in zip(["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"], heads, inputs):
        with torch.no_grad():
            pred = head.eval()(x.half().float()).argmax(1)
        assert result["top1"][name] == round(100.0 * int((pred == y_va).sum()) / 256, 2), name
    assert result["top1"]["feature1"] > 30  # and the heads learned: 10 classes, chance is 10


def capture_heads(monkeypatch) -> list:
    """Copies of the heads ``run_probes`` evaluates, in the order it evaluates them."""
    import copy

    from barlow import probe

    heads, correct = [], probe.count_correct

    def capture(head, x, y, batch=2048):
        heads.append(copy.deepcopy(head))
        return correct(head, x, y, batch)

    monkeypatch.setattr(probe, "count_correct", capture)
    return heads


def test_val_from_another_dataset_is_refused(tmp_path):
    import shutil

    from barlow.convert import convert
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
    from barlow.features import eval_view, extract
    from barlow.augment import BatchAugment

    probes = Probes(backbone("resnet18"), 32)
    aug = BatchAugment(eval_view(32, {}, (0.5,) * 3, (0.5,) * 3))
    feats, y = extract(probes, fmnist_tiny["val"], ["feature1", "avgpool"], aug, {"batch_size": 100}, 1, 0,
                        list(range(150)), "cpu", "simple", 32, env=Env())
    assert len(y) == 150 and y.device.type == "cpu"
    for v in feats.values():
        assert v.dtype == torch.float16 and v.device.type == "cpu" and len(v) == 150


def eval_images(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Fashion-MNIST images of ``split`` as the probes' eval view should see them,
    read straight from the IDX files: 28 px zero-padded to 32, grey to 3 channels, /255, then the
    fmnist_r18 mean/std (0.286, 0.353)."""
    import gzip

    import numpy as np

    from tests.conftest import FMNIST

    stem = {"train": "train", "val": "t10k"}[split]
    with gzip.open(FMNIST / f"{stem}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(FMNIST / f"{stem}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    x = torch.from_numpy(np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 255.0)
    x = ((x - 0.286) / 0.353)[:, None].expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels.astype(np.int64))


def backbone_maps(weights, x: torch.Tensor) -> list[torch.Tensor]:
    """Feature1..5 maps of the saved backbone (torchvision's forward, unrolled by barlow.model.features)."""
    from barlow.model import features

    net = backbone("resnet18")
    net.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    with torch.no_grad():
        return features(net.eval(), x)


def calibrated_backbone(path, x: torch.Tensor):
    """A random ResNet-18 whose AvgPool features tell the classes apart: no zero-init residual (with
    it, layer4's 1x1 map at 32 px sees only the image's top-left corner: kNN at chance) and BN
    statistics of ``x`` (one forward in train mode, cumulative average)."""
    from barlow.atomic import save_torch

    torch.manual_seed(0)
    net = backbone("resnet18", zero_init_residual=False)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(x)
    save_torch({"arch": "resnet18", "state_dict": net.state_dict(), "epochs": 0, "steps": 0}, path)
    return path


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "augmented"])
def test_knn_is_that_of_the_backbones_avgpool_features(fmnist_tiny, tmp_path, cached):
    from barlow.knn import knn_top1

    (x_tr, y_tr), (x_va, y_va) = eval_images("train", 384), eval_images("val", 256)
    weights = calibrated_backbone(tmp_path / "backbone.pth", x_tr)
    cfg = resolve("fmnist_r18", {"pretrain": {"init": "random"}, "probe": {"workers": 1, "passes": [
        {"name": "avg", "cached": cached, "heads": ["avgpool"], "epochs": 1, "batch_size": 128,
         "optimizer": "adamw", "lr": 0.01, "augment": {"scale": [0.5, 1.0]}}]}})
    result = run_probes(cfg, weights, fmnist_tiny["train"], fmnist_tiny["val"], tmp_path / "probes.json",
                        log=lambda *a: None)
    written = json.loads((tmp_path / "probes.json").read_text())["knn"]
    assert written == result["knn"]
    # AvgPool = global mean of layer4; kept as float16, as the probes cache features
    bank, query = (backbone_maps(weights, x)[-1].mean((2, 3)).half() for x in (x_tr, x_va))
    expected = knn_top1(bank, y_tr, query, y_va)
    assert written == {"features": "avgpool", "k": 20, "top1": expected[20], "top1_k200": expected[200],
                       "temperature": 0.07, "bank": 384, "queries": 256}
    assert written["top1"] > 40  # 10 classes: far from chance, so the match is no coincidence


def test_merge_passes_carries_the_avgpool_pass_knn(tmp_path):
    from barlow.probe_merge import merge_passes

    knn = {"features": "avgpool", "k": 20, "top1": 71.5, "top1_k200": 70.25, "temperature": 0.07, "bank": 10,
           "queries": 5}
    parts = []
    for name, heads, k in (("five", ["feature1"], None), ("avg", ["avgpool"], knn)):
        blob = {"top1": {h: 50.0 for h in heads}, "dims": {h: 1 for h in heads}, "knn": k, "probe_wall_s": 1.0,
                "backbone": "b.pth", "config": {"probe": {"passes": [{"name": name}]}}}
        parts.append(tmp_path / f"{name}.json")
        parts[-1].write_text(json.dumps(blob))
    assert merge_passes(parts, tmp_path / "probes.json")["knn"] == knn
    assert json.loads((tmp_path / "probes.json").read_text())["knn"] == knn
    assert merge_passes(parts[:1], tmp_path / "p1.json")["knn"] is None


@pytest.mark.slow  # ~20 s on 2 cores: two spawned processes import torch and FFCV
def test_two_processes_gather_the_knn_of_one(fmnist_tiny, tmp_path):
    """383 train images: uneven shards (192 + 191), so the gather drops FFCV's padding."""

    from tests.conftest import free_port
    from tests.test_probe_distributed import _rank

    weights = calibrated_backbone(tmp_path / "backbone.pth", eval_images("train", 383)[0])
    no_aug = {"crop": False, "flip_p": 0.0}
    cfg = resolve("fmnist_r18", {"pretrain": {"init": "random"}, "probe": {"limit_train": 383, "workers": 1, "passes": [
        {"name": name, "cached": cached, "heads": ["avgpool"], "epochs": 1, "batch_size": 64, "optimizer": "adamw",
         "lr": 0.01, "augment": no_aug} for name, cached in (("cached", True), ("augmented", False))]}})
    one = run_probes(cfg, weights, fmnist_tiny["train"], fmnist_tiny["val"], tmp_path / "one.json", log=lambda *a: None)
    assert one["knn"]["bank"] == 383 and one["knn"]["top1"] > 40  # far from chance: a misaligned gather shows
    two = tmp_path / "two"
    two.mkdir()
    run_ranks(_rank, 2, free_port(), cfg, weights, fmnist_tiny, str(two))
    assert json.loads((two / "probes.json").read_text())["knn"] == one["knn"]


def test_resumed_run_keeps_the_knn_of_a_finished_pass(fmnist_tiny, tmp_path, monkeypatch):
    """Stopped in the second pass, the rerun skips the AvgPool pass: its kNN comes from the checkpoint."""
    from barlow import fit, probe

    weights = random_backbone(tmp_path / "backbone.pth")
    cfg = resolve("fmnist_r18", {"pretrain": {"init": "random"}, "probe": {"workers": 1, "passes": [
        {"name": name, "cached": True, "heads": [head], "epochs": 1, "batch_size": 64, "optimizer": "adamw",
         "lr": 0.01} for name, head in (("avg", "avgpool"), ("f5", "feature5"))]}})
    run = lambda out: run_probes(cfg, weights, fmnist_tiny["train"], fmnist_tiny["val"], out, log=lambda *a: None)  # noqa: E731
    unbroken = run(tmp_path / "a" / "probes.json")
    assert unbroken["knn"]["bank"] == 384

    real, steps = fit.sgd_step, []

    def stop_in_second_pass(t, *args, **kwargs):
        steps.append(t.name)
        if steps.count("feature5") == 3:
            raise KeyboardInterrupt
        return real(t, *args, **kwargs)

    out = tmp_path / "b" / "probes.json"
    with monkeypatch.context() as m:
        m.setattr(fit, "sgd_step", stop_in_second_pass)
        with pytest.raises(KeyboardInterrupt):
            run(out)
    assert torch.load(probe.checkpoint_path(out), weights_only=True)["knn"] == unbroken["knn"]
    monkeypatch.setattr(probe, "knn_record", lambda *a, **k: pytest.fail("the finished pass's kNN was recomputed"))
    assert run(out)["knn"] == unbroken["knn"]
