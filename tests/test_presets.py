"""The ImageNet presets: what the code builds from them, and how the variants differ from the base.

The values of imagenet_r50_ep300 are pinned to the upstream MMSelfSup/mmcv files in
tests/test_presets_upstream.py; the probe protocols' literal values here also come from those
configs (resnet50_mhead_linear-8xb32-steplr-90e_in1k.py, resnet50_linear-8xb32-steplr-100e_in1k.py). Where the code turns a
value into behaviour (augmentation views, probe optimizers, lr schedules, pooling) we check what the
code builds from the resolved preset, not only the YAML.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn

from barlow.config import PRESETS, resolve

BASE = "imagenet_r50_ep300"
ACCU4 = "imagenet_r50_ep300_accu4"
FAST = "imagenet_r50_ep300_fastprobe"
FEATURES = ["feature1", "feature2", "feature3", "feature4", "feature5"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def cfgs() -> dict:
    return {name: resolve(name) for name in (BASE, ACCU4, FAST)}


@pytest.fixture(scope="module")
def probes():
    """ResNet-50 at 224 px on the CPU (one forward at batch 1 inside Probes)."""
    from barlow.model import backbone
    from barlow.heads import Probes

    torch.manual_seed(0)
    return Probes(backbone("resnet50"), 224)


def _pass(cfg: dict, name: str) -> dict:
    (p,) = [p for p in cfg["probe"]["passes"] if p["name"] == name]
    return p


def _diff(a, b, prefix="") -> set[str]:
    """Dotted keys whose values differ between two resolved configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        return set().union(*[_diff(a.get(k), b.get(k), f"{prefix}{k}.") for k in set(a) | set(b)])
    return set() if a == b else {prefix.rstrip(".")}


def _trainers(probes, pcfg: dict) -> dict:
    from barlow.heads import make_trainers

    return {t.name: t for t in make_trainers(probes, pcfg, classes=10, device="cpu")}


def _lr_by_epoch(trainer, epochs: list[int]) -> list[float]:
    out = []
    for e in epochs:
        trainer.set_epoch(e)
        out.append(trainer.opt.param_groups[0]["lr"])
    return out


# --------------------------------------------------------------------------- every preset


def test_every_imagenet_preset_resolves_with_a_one_line_description():
    names = sorted(p.stem for p in PRESETS.glob("imagenet_*.yaml"))
    assert {BASE, ACCU4, FAST} <= set(names)
    for name in names:
        cfg = resolve(name)
        desc = cfg.get("description", "")
        assert desc and "\n" not in desc, name
    for name in (BASE, ACCU4, FAST):
        cfg = resolve(name)
        assert cfg["model"]["arch"] == "resnet50" and cfg["data"]["image_size"] == 224, name


# --------------------------------------------------------------------------- pretraining


def test_model_shapes_on_the_meta_device(cfgs):
    """The values themselves are pinned to the upstream files in tests/test_presets_upstream.py."""
    from barlow.model import projector

    m = cfgs[BASE]["model"]
    with torch.device("meta"):
        proj = projector(2048, m["projector"], m["projector_bias"], m["projector_init"])
    # 2048->8192 Linear BN ReLU -> 8192->8192 Linear BN ReLU -> 8192->8192 Linear, no bias anywhere
    assert [type(x) for x in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    linears = [x for x in proj if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [(2048, 8192), (8192, 8192), (8192, 8192)]
    assert [x.bias is not None for x in linears] == [False, False, False]
    # One checkpoint per epoch of 1,281,167 // 2048 = 625 steps (the trainer also saves at epoch ends).
    assert cfgs[BASE]["pretrain"]["checkpoint_every_steps"] == 625 == 1_281_167 // 2048


def test_augmentation_pair_is_the_published_asymmetric_pair(cfgs):
    from barlow.augment import views_from_config

    v1, v2 = views_from_config(cfgs[BASE])
    common = {
        "size": 224, "crop": False,  # the FFCV RandomResizedCrop decoder crops (decode: rrc)
        "scale": (0.08, 1.0), "flip_p": 0.5, "jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "gray_p": 0.2,
        "blur_sigma": (0.1, 2.0), "lighting": 0.0, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
    }
    for v, blur_p, solarize_p in ((v1, 1.0, 0.0), (v2, 0.1, 0.2)):
        assert {k: getattr(v, k) for k in common} == common
        assert v.ratio == pytest.approx((3 / 4, 4 / 3))
        assert (v.blur_p, v.solarize_p) == (blur_p, solarize_p)
    # The decoder's crop scale is view1's (pretrain passes it to make_loader).
    assert tuple(cfgs[BASE]["pretrain"]["augment"]["view1"]["scale"]) == (0.08, 1.0)


# --------------------------------------------------------------------------- probes


def test_default_probe_is_the_two_published_protocols(cfgs):
    pc = cfgs[BASE]["probe"]
    assert pc["protocol"] == "published"
    assert [p["name"] for p in pc["passes"]] == ["five_feature", "avgpool"]
    assert pc.get("pooling") == "published"
    assert pc.get("limit_train") is None
    assert not any(p.get("cached") for p in pc["passes"])  # augmented: the backbone runs every epoch


def test_five_feature_protocol(cfgs, probes):
    from barlow.features import eval_view, train_view

    p = _pass(cfgs[BASE], "five_feature")
    expected = {"heads": FEATURES, "optimizer": "sgd", "lr": 0.01, "nesterov": True, "momentum": 0.9,
                "weight_decay": 1e-4, "norm_weight_decay": 0.0, "milestones": [30, 60], "gamma": 0.1,
                "epochs": 90, "batch_size": 256, "eval_resize": 256}
    assert {k: p.get(k) for k in expected} == expected
    assert not p.get("head_overrides")
    tr = train_view(224, p["augment"], IMAGENET_MEAN, IMAGENET_STD)
    # RandomResizedCrop 224 (0.08-1; FFCV decoder), flip, ColorJitter(0.4, 0.4, 0.4, 0) always, lighting 0.1
    assert (tr.size, tr.crop, tr.scale, tr.flip_p, tr.jitter, tr.jitter_p) == (224, False, (0.08, 1.0), 0.5,
                                                                              (0.4, 0.4, 0.4, 0.0), 1.0)
    assert (tr.gray_p, tr.blur_p, tr.solarize_p, tr.lighting) == (0.0, 0.0, 0.0, 0.1)
    ev = eval_view(224, p["eval_augment"], IMAGENET_MEAN, IMAGENET_STD)
    assert (ev.crop, ev.flip_p, ev.jitter_p, ev.gray_p, ev.blur_p, ev.solarize_p, ev.lighting) == (False, 0, 0, 0, 0, 0, 0)
    assert 224 / p["eval_resize"] == 224 / 256  # the center decoder's ratio: resize 256 -> center crop 224
    trainers = _trainers(probes, p)
    assert list(trainers) == FEATURES
    for t in trainers.values():
        d = t.opt.defaults
        assert isinstance(t.opt, torch.optim.SGD) and d["nesterov"] and d["momentum"] == 0.9
        assert [g["weight_decay"] for g in t.opt.param_groups] == [1e-4]  # affine-free BN: no norm params
        assert t.epochs == 90 and t.schedule == "step"
        assert _lr_by_epoch(t, [0, 29, 30, 59, 60, 89]) == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])


def test_avgpool_protocol(cfgs, probes):
    from barlow.features import train_view

    p = _pass(cfgs[BASE], "avgpool")
    expected = {"heads": ["avgpool"], "optimizer": "sgd", "lr": 30.0, "momentum": 0.9, "nesterov": False,
                "weight_decay": 0.0, "milestones": [60, 80], "gamma": 0.1, "epochs": 100, "batch_size": 256,
                "eval_resize": 256}
    assert {k: p.get(k) for k in expected} == expected
    tr = train_view(224, p["augment"], IMAGENET_MEAN, IMAGENET_STD)
    # RandomResizedCrop 224 (0.08-1; FFCV decoder) + flip only
    assert (tr.crop, tr.scale, tr.flip_p) == (False, (0.08, 1.0), 0.5)
    assert (tr.jitter_p, tr.gray_p, tr.blur_p, tr.solarize_p, tr.lighting) == (0.0, 0.0, 0.0, 0.0, 0.0)
    (t,) = _trainers(probes, p).values()
    assert not t.opt.defaults["nesterov"] and t.opt.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in t.opt.param_groups] == [0.0]
    assert t.epochs == 100
    assert _lr_by_epoch(t, [0, 59, 60, 79, 80, 99]) == pytest.approx([30, 30, 3, 3, 0.3, 0.3])


def test_published_pooling_table_and_feature_dims(probes):
    from barlow.heads import pooling_plan

    pools = pooling_plan([64, 256, 512, 1024, 2048], [112, 56, 28, 14, 7])
    assert all(type(m) is nn.AvgPool2d for m in pools)
    assert [(m.kernel_size, m.stride, m.padding) for m in pools] == [(10, 10, 4), (16, 8, 0), (13, 5, 0),
                                                                     (8, 3, 0), (6, 1, 0)]
    assert probes.sizes == [112, 56, 28, 14, 7]
    assert probes.out_sides == [12, 6, 4, 3, 2]
    assert probes.dims() == {"feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216,
                             "feature5": 8192, "avgpool": 2048}


# --------------------------------------------------------------------------- derived presets


def test_accu4_is_8_gpus_x_64_x_4_and_differs_only_in_accumulation(cfgs):
    base, accu = cfgs[BASE], cfgs[ACCU4]
    assert _diff(base, accu) == {"description", "pretrain.accumulation"}
    assert accu["pretrain"]["accumulation"] == 4
    assert 8 * 64 * 4 == 2048 == accu["pretrain"]["batch_size"]
    # per-GPU batch on 1 node x 8 GPUs = batch / (8 x accumulation)
    assert accu["pretrain"]["batch_size"] // (1 * 8 * accu["pretrain"]["accumulation"]) == 64
    assert base["pretrain"]["batch_size"] // (1 * 8 * base["pretrain"]["accumulation"]) == 256
    assert "8 GPUs x 64 x 4" in accu["description"]


def test_exact_variant_differs_only_in_the_loss():
    base, exact = resolve(BASE), resolve("imagenet_r50_ep300_exact")
    assert _diff(base, exact) == {"description", "pretrain.loss", "pretrain.loss_group"}
    assert (exact["pretrain"]["loss"], exact["pretrain"]["loss_group"]) == ("exact", None)
    assert "NOT the recipe" in exact["description"]


def test_fastprobe_single_pass(cfgs, probes):
    base, fast = cfgs[BASE], cfgs[FAST]
    assert _diff(base, fast) == {"description", "probe.protocol", "probe.passes"}
    assert fast["probe"]["protocol"] == "single_pass"
    (p,) = fast["probe"]["passes"]
    assert p["heads"] == FEATURES + ["avgpool"] and not p.get("cached")
    assert p["head_overrides"] == {"avgpool": {"lr": 30.0, "nesterov": False, "weight_decay": 0.0, "milestones": [60, 80],
                                               "epochs": 100}}
    # Everything else is the five-feature pass, augmentation included.
    five = _pass(base, "five_feature")
    same = {k: v for k, v in p.items() if k not in ("name", "heads", "head_overrides")}
    assert same == {k: v for k, v in five.items() if k not in ("name", "heads")}
    trainers = _trainers(probes, p)
    for name in FEATURES:
        t = trainers[name]
        assert (t.base_lr, t.epochs, t.milestones, t.opt.defaults["nesterov"]) == (0.01, 90, [30, 60], True)
        assert [g["weight_decay"] for g in t.opt.param_groups] == [1e-4]
    a = trainers["avgpool"]
    assert (a.base_lr, a.epochs, a.milestones, a.opt.defaults["momentum"]) == (30.0, 100, [60, 80], 0.9)
    assert [g["weight_decay"] for g in a.opt.param_groups] == [0.0]
    assert _lr_by_epoch(a, [0, 60, 80]) == pytest.approx([30, 3, 0.3])
    # The description states how it differs from the published AvgPool protocol.
    desc = fast["description"].lower()
    assert "single-pass" in desc and "five-feature augmentation" in desc and "avgpool" in desc
    assert ("nesterov" in desc) == a.opt.defaults["nesterov"]  # published AvgPool: plain momentum
