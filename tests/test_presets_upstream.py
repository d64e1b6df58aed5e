"""imagenet_r50_ep300 against the upstream files that produced the published numbers.

Oracles (transcribed in tests/upstream/mmselfsup_v0.py, with repository, tag and commit):
- MMSelfSup v0.11.0 ``configs/selfsup/barlowtwins/barlowtwins_resnet50_8xb256-coslr-300e_in1k.py`` with
  its ``_base_`` files (models/barlowtwins.py, datasets/imagenet_byol.py, schedules/lars_coslr-200e_in1k.py);
- ``mmselfsup/core/optimizer/optimizers.py`` (LARS), ``mmselfsup/models/necks/nonlinear_neck.py``,
  ``mmselfsup/models/heads/latent_pred_head.py``, ``mmselfsup/models/utils/multi_pooling.py``,
  ``mmselfsup/datasets/pipelines/transforms.py`` (Lighting);
- mmcv v1.5.0 ``mmcv/runner/hooks/lr_updater.py`` (CosineAnnealing with linear warmup) and
  ``mmcv/cnn/utils/weight_init.py`` (KaimingInit defaults);
- the linear evaluations ``configs/benchmarks/classification/imagenet/resnet50_mhead_linear-8xb32-steplr-90e_in1k.py``
  and ``resnet50_linear-8xb32-steplr-100e_in1k.py`` with their bases.
Values come from those files, never from our notes; a few hand-computed values back the formulas.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from barlow.config import resolve
from barlow.optim import LARS, group_lrs, param_groups
from tests import upstream as up
from tests.upstream import mmselfsup_v0

BASE = "imagenet_r50_ep300"
GPUS, PER_GPU = 8, 256  # the config's name: 8xb256 (8 GPUs x samples_per_gpu)


@pytest.fixture(scope="module")
def mm():
    return up.mmcv_config(up.PRETRAIN_300E)


@pytest.fixture(scope="module")
def cfg():
    return resolve(BASE)


def test_batch_epochs_precision_and_loss(cfg, mm):
    p = cfg["pretrain"]
    assert "8xb256" in up.PRETRAIN_300E and mm["data"]["samples_per_gpu"] == PER_GPU
    assert p["batch_size"] == GPUS * mm["data"]["samples_per_gpu"] and p["accumulation"] == 1
    assert p["epochs"] == mm["runner"]["max_epochs"] == 300
    assert ("fp16" in mm) is False and p["precision"] == "fp32"
    # the loss head: per-GPU BN over samples_per_gpu, plain all_reduce -> as_trained with that group
    # (tests/test_loss_as_trained.py checks the gradients against that head on real gloo ranks)
    assert mm["model"]["head"]["type"] == "LatentCrossCorrelationHead"
    assert (p["loss"], p["loss_group"]) == ("as_trained", mm["data"]["samples_per_gpu"])
    assert mm["model"]["head"].get("lambd", mmselfsup_v0.HEAD_LAMBD) == p["lambd"] == 0.0051


def test_model(cfg, mm):
    from barlow.model import projector

    m, bb, neck = cfg["model"], mm["model"]["backbone"], mm["model"]["neck"]
    assert m["arch"] == f"resnet{bb['depth']}" and m["zero_init_residual"] is bb["zero_init_residual"]
    assert m["sync_bn"] is (bb["norm_cfg"]["type"] == "SyncBN")
    neck_defaults = mmselfsup_v0.NONLINEAR_NECK_DEFAULTS
    assert neck["num_layers"] == 3 and m["projector"] == [neck["hid_channels"], neck["hid_channels"], neck["out_channels"]]
    assert m["projector_bias"] is neck.get("with_bias", neck_defaults["with_bias"]) is False
    assert neck.get("with_last_bias", neck_defaults["with_last_bias"]) is False and neck["with_last_bn"] is False
    # init_cfg Kaiming uniform on Linear, with mmcv's KaimingInit defaults: U(+-sqrt(6 / fan_out))
    assert neck["init_cfg"] == {"type": "Kaiming", "distribution": "uniform", "layer": ["Linear"]}
    kaiming = up.mmcv_kaiming_init_defaults()
    assert (kaiming["a"], kaiming["mode"], kaiming["nonlinearity"]) == (0, "fan_out", "relu")
    assert m["projector_init"] == "kaiming_fan_out"
    torch.manual_seed(0)
    proj = projector(64, [512, 512, 256], m["projector_bias"], m["projector_init"])
    for lin in (x for x in proj if isinstance(x, nn.Linear)):
        bound = (6 / lin.out_features) ** 0.5
        assert lin.bias is None and lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.98 * bound
        assert lin.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)


def test_optimizer_settings_and_parameter_split(cfg, mm):
    from barlow.model import BarlowTwins

    p, opt = cfg["pretrain"], mm["optimizer"]
    assert (p["optimizer"], p["lars"]) == (opt["type"].lower(), "mmselfsup")
    assert (p["lr"], p["momentum"], p["weight_decay"]) == (opt["lr"], opt["momentum"], opt["weight_decay"])
    assert p["eta"] == opt.get("eta", mmselfsup_v0.LARS_DEFAULTS["eta"]) == 0.001
    rules = opt["paramwise_options"]
    assert all(r == {"weight_decay": 0, "lr_mult": p["bias_lr_ratio"], "lars_exclude": True} for r in rules.values())
    # MMSelfSup picks excluded parameters by re.search of these keys on the names; ours: ndim == 1.
    with torch.device("meta"):
        model = BarlowTwins("resnet50", [8192, 8192, 8192], projector_bias=False)
    neck_names = {0: "fc0", 1: "bn0", 3: "fc1", 4: "bn1", 6: "fc2"}  # NonLinearNeck's module names

    def upstream_name(name):
        part, _, rest = name.partition(".")
        if part == "projector":
            idx, _, leaf = rest.partition(".")
            return f"neck.{neck_names[int(idx)]}.{leaf}"
        return name

    excluded = {n for n, _ in model.named_parameters() if any(re.search(k, upstream_name(n)) for k in rules)}
    _, vectors = param_groups(model, p["weight_decay"], p["bias_lr_ratio"])
    ours = {n for n, q in model.named_parameters() if any(q is v for v in vectors["params"])}
    assert excluded == ours and len(ours) == 2 * 53 + 2 * 2  # ResNet-50 BNs (incl. downsample) + 2 neck BNs


def test_lars_step_equals_mmselfsup_lars():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4, bias=False)).double()  # noqa: E731
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    ours = LARS(param_groups(a, 1e-6, 0.024), lr=1.6, momentum=0.9, mode="mmselfsup")
    UpLARS = up.mmselfsup_lars()
    w = [q for q in b.parameters() if q.ndim > 1]
    v = [q for q in b.parameters() if q.ndim == 1]
    ref = UpLARS([{"params": w, "weight_decay": 1e-6}, {"params": v, "weight_decay": 0, "lars_exclude": True}],
                 lr=1.6, momentum=0.9, weight_decay=1e-6)
    x = torch.randn(16, 6, dtype=torch.float64)
    for step, lr in enumerate([1.6e-4 * 1.6, 0.4, 1.6, 0.9]):  # a changing lr: it enters the momentum buffer
        for m, o in ((a, ours), (b, ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        for g, r in zip(ours.param_groups, (1.0, 0.024)):
            g["lr"] = lr * r
        ref.param_groups[0]["lr"], ref.param_groups[1]["lr"] = lr, lr * 0.024
        ours.step()
        ref.step()
        for q, s in zip(a.parameters(), b.parameters()):
            assert torch.allclose(q, s, rtol=1e-12, atol=1e-15), f"step {step}"


def test_schedule_equals_mmcv_cosine_annealing_for_both_groups(cfg, mm):
    p = cfg["pretrain"]
    per_epoch = 1_281_167 // p["batch_size"]
    total, warmup = p["epochs"] * per_epoch, int(p["warmup_epochs"] * per_epoch)
    lr_cfg = {k: v for k, v in mm["lr_config"].items() if k != "policy"}
    assert mm["lr_config"]["policy"] == "CosineAnnealing" and lr_cfg["by_epoch"] is False  # by iteration, as ours
    assert (p["schedule"], p["min_lr"], p["warmup_start_ratio"], p["warmup_epochs"]) == (
        "mmcv", lr_cfg["min_lr"], lr_cfg["warmup_ratio"], lr_cfg["warmup_iters"])
    ratios = [1.0, p["bias_lr_ratio"]]
    for t in (0, 1, warmup // 2, warmup - 1, warmup, total // 2, total - 1):
        theirs = [up.mmcv_cosine_lr(p["lr"] * r, t, total, lr_cfg["min_lr"], warmup, lr_cfg["warmup_ratio"])
                  for r in ratios]
        assert group_lrs(p, t, total, warmup, ratios) == pytest.approx(theirs, rel=1e-12), t
    # by hand: step 0 = 1.6 x 1.6e-4 (weights) and 0.0384 x 1.6e-4 (biases); end of warmup = the cosine
    # at W/T = 1/30; half-way = (base + 0.0016) / 2; the bias group ends at the ABSOLUTE 0.0016
    assert group_lrs(p, 0, total, warmup, ratios) == pytest.approx([1.6 * 1.6e-4, 0.0384 * 1.6e-4])
    cos_w = 0.0016 + 0.5 * (1.6 - 0.0016) * (1 + math.cos(math.pi / 30))
    assert group_lrs(p, warmup, total, warmup, ratios)[0] == pytest.approx(cos_w)
    assert group_lrs(p, total // 2, total, warmup, ratios) == pytest.approx([(1.6 + 0.0016) / 2,
                                                                           (0.0384 + 0.0016) / 2])
    assert group_lrs(p, total, total, warmup, ratios) == pytest.approx([0.0016, 0.0016])


def test_augmentation_pair_equals_imagenet_byol(cfg, mm):
    from barlow.augment import views_from_config

    pipes = mm["data"]["train"]["pipelines"]
    for view, pipe in zip(views_from_config(cfg), pipes):
        ops = {d["type"]: d for d in pipe}
        assert ops["RandomResizedCrop"]["size"] == view.size == 224
        # bicubic upstream (interpolation=3); FFCV's decoder resizes with INTER_AREA: a named deviation
        assert ops["RandomResizedCrop"]["interpolation"] == 3 and cfg["pretrain"]["decode"] == "rrc"
        jitter = ops["RandomAppliedTrans"]
        (cj,) = jitter["transforms"]
        assert view.jitter == (cj["brightness"], cj["contrast"], cj["saturation"], cj["hue"])
        assert view.jitter_p == jitter["p"] and view.gray_p == ops["RandomGrayscale"]["p"]
        assert view.blur_p == ops["GaussianBlur"]["p"]
        assert view.blur_sigma == (ops["GaussianBlur"]["sigma_min"], ops["GaussianBlur"]["sigma_max"])
        assert view.solarize_p == ops["Solarization"]["p"] and view.flip_p == 0.5
        assert list(view.mean) == ops["Normalize"]["mean"] and list(view.std) == ops["Normalize"]["std"]


def _pass(cfg, name):
    (p,) = [p for p in cfg["probe"]["passes"] if p["name"] == name]
    return p


def test_five_feature_probe_equals_mhead_config(cfg):
    mh = up.mmcv_config(up.MHEAD_90E)
    p, opt = _pass(cfg, "five_feature"), mh["optimizer"]
    assert "8xb32" in up.MHEAD_90E and p["batch_size"] == 8 * mh["data"]["samples_per_gpu"]
    assert (p["lr"], p["momentum"], p["weight_decay"], p["nesterov"]) == (opt["lr"], opt["momentum"],
                                                                           opt["weight_decay"], opt["nesterov"])
    assert p["epochs"] == mh["runner"]["max_epochs"]
    assert p["milestones"] == [s for s in mh["lr_config"]["step"] if s < mh["runner"]["max_epochs"]]
    head = mh["model"]["head"]
    assert head["in_indices"] == [0, 1, 2, 3, 4] and head["norm_cfg"] == {"type": "SyncBN", "momentum": 0.1, "affine": False}
    from barlow.heads import PUBLISHED_POOL

    assert cfg["probe"]["pooling"] == "published" and list(PUBLISHED_POOL) == mmselfsup_v0.POOL_PARAMS
    ops = {d["type"]: d for d in mh["data"]["train"]["pipeline"]}
    cj = ops["ColorJitter"]
    assert tuple(p["augment"]["jitter"]) == (cj["brightness"], cj["contrast"], cj["saturation"], cj["hue"])
    assert p["augment"]["lighting"] == ops["Lighting"].get("alphastd", mmselfsup_v0.LIGHTING_ALPHASTD)
    assert ops["RandomResizedCrop"]["size"] == 224 and "interpolation" not in ops["RandomResizedCrop"]  # bilinear
    val = {d["type"]: d for d in mh["data"]["val"]["pipeline"]}
    assert p["eval_resize"] == val["Resize"]["size"] and val["CenterCrop"]["size"] == 224


def test_avgpool_probe_equals_linear_config(cfg):
    lc = up.mmcv_config(up.LINEAR_100E)
    p, opt = _pass(cfg, "avgpool"), lc["optimizer"]
    assert p["batch_size"] == 8 * lc["data"]["samples_per_gpu"]
    assert (p["lr"], p["momentum"], p["weight_decay"]) == (opt["lr"], opt["momentum"], opt["weight_decay"])
    assert p["nesterov"] is opt.get("nesterov", False)
    assert p["epochs"] == lc["runner"]["max_epochs"] and p["milestones"] == lc["lr_config"]["step"]
    assert lc["model"]["head"]["with_avg_pool"] and lc["model"]["head"]["in_channels"] == 2048
    assert [d["type"] for d in lc["data"]["train"]["pipeline"]][:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert not {"ColorJitter", "Lighting"} & {d["type"] for d in lc["data"]["train"]["pipeline"]}
    assert p["augment"].get("jitter_p", 0) == 0 and p["augment"].get("lighting", 0) == 0
