"""cifar10_r18_ep1000, cifar100_r18_ep1000 and imagenet100_r18_ep1000 against OpenMixup's own files.

Oracles (transcribed in tests/upstream/openmixup.py from Westlake-AI/openmixup at the commit in
tests/upstream/README.md, each value with the file it comes from):
- configs/selfsup/barlowtwins/{cifar10,cifar100}/r18_8xb256_cos_lr1_6_fp16_ep1000.py and
  imagenet100/r18_8xb64_accu4_cos_lr1_6_fp16_ep1000.py with their ``_base_`` files (models/barlowtwins/r18.py,
  datasets/{cifar10,cifar100}/byol_sz224_bs256.py, datasets/imagenet100/byol_sz224_bs64.py -> imagenet/...);
- the linear evaluations configs/benchmarks/classification/{cifar10,cifar100,imagenet100}/r18_linear_sz224_4xb64_step_ep100.py
  and the ImageNet multi-head one (imagenet/r50_mhead_sz224_4xb64_step_ep90.py) used for Feature1-5;
- openmixup/core/optimizers/lars.py, models/heads/latent_pred_head.py, models/necks/mlp_necks.py,
  models/selfsup/barlowtwins.py, models/backbones/resnet_mmcls.py, models/heads/multi_cls_head.py,
  datasets/pipelines/transforms.py (Lighting), core/hooks/optimizer_hook.py;
- HobbitLong/CMC imagenet100.txt (the ImageNet-100 class list: its git blob id and sha256).
Values are read from that transcription, never typed into the tests from our notes.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from barlow.config import resolve
from barlow.optim import LARS, group_lrs, param_groups
from tests import upstream as up
from tests.upstream import openmixup as om

PRESETS = list(om.PRETRAIN)


@pytest.fixture(scope="module", params=PRESETS)
def pair(request):
    return request.param, resolve(request.param), om.CONFIGS[om.PRETRAIN[request.param]]


def _per_gpu_and_gpus(rel: str) -> tuple[int, int]:
    m = re.search(r"(\d+)xb(\d+)", rel)
    return int(m.group(1)), int(m.group(2))


def test_batch_accumulation_epochs_precision_and_loss(pair):
    name, cfg, mm = pair
    p = cfg["pretrain"]
    gpus, per_gpu = _per_gpu_and_gpus(om.PRETRAIN[name])
    assert mm["data"]["imgs_per_gpu"] == per_gpu
    assert p["accumulation"] == mm["update_interval"] == mm["optimizer_config"]["update_interval"]
    assert p["batch_size"] == gpus * per_gpu * mm["update_interval"] == 2048
    assert p["epochs"] == mm["runner"]["max_epochs"] == 1000
    assert mm["use_fp16"] is True and mm["fp16"] == {"type": "mmcv", "loss_scale": "dynamic"}
    assert p["precision"] == "amp_fp16"  # torch's GradScaler, dynamic
    # the loss head is MMSelfSup's (per-GPU BN over imgs_per_gpu samples, plain all_reduce) -> as_trained
    assert (p["loss"], p["loss_group"]) == ("as_trained", per_gpu)
    assert mm["model"]["head"]["type"] == "LatentCrossCorrelationHead"
    assert mm["model"]["head"].get("lambd", om.HEAD_LAMBD) == p["lambd"]
    # upstream accumulates separate micro-batch losses: accumulation_loss micro_batch where it accumulates
    assert "each micro-batch's own loss / update_interval" in om.ACCUMULATION
    assert p.get("accumulation_loss", "step") == ("micro_batch" if mm["update_interval"] > 1 else "step")


def test_head_value_equals_our_as_trained_loss_on_one_gpu():
    torch.manual_seed(0)
    z1, z2 = torch.randn(64, 32, dtype=torch.float64), torch.randn(64, 32, dtype=torch.float64)
    head = up.LatentCrossCorrelationHead(in_channels=32).double()  # OpenMixup's head is this algorithm
    theirs = head(z1, z2)["loss"]
    from barlow.loss import as_trained_loss

    ours, scale = as_trained_loss(z1, z2, head.lambd, group=64, offset=0, total=64)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10) and scale == 1.0


def test_model(pair):
    from barlow.model import projector

    name, cfg, mm = pair
    m, bb, neck = cfg["model"], mm["model"]["backbone"], mm["model"]["neck"]
    assert bb["type"] == "ResNet" and m["arch"] == f"resnet{bb['depth']}" == "resnet18"  # ImageNet stem, not ResNet_CIFAR
    resnet = om.RESNET_DEFAULTS
    assert m["zero_init_residual"] is bb.get("zero_init_residual", resnet["zero_init_residual"]) is True
    assert resnet["deep_stem"] is False and bb["style"] == "pytorch"
    assert m["sync_bn"] is (bb["norm_cfg"]["type"] == "SyncBN")
    nd = om.NONLINEAR_NECK_DEFAULTS
    assert neck["type"] == "NonLinearNeck" and neck["num_layers"] == 3 and neck["in_channels"] == 512
    assert m["projector"] == [neck["hid_channels"], neck["hid_channels"], neck["out_channels"]]
    assert m["projector_bias"] is neck["with_bias"] is True and neck.get("with_last_bias", nd["with_last_bias"]) is False
    assert neck["with_last_bn"] is False
    # BarlowTwins.init_weights -> neck.init_weights(init_linear='kaiming') -> kaiming_init(m, mode='fan_in', relu)
    init = om.NECK_LINEAR_INIT
    assert (init["mode"], init["distribution"], init["nonlinearity"], init["a"], init["bias"]) == ("fan_in", "normal",
                                                                                                  "relu", 0, 0)
    assert m["projector_init"] == "kaiming_normal_fan_in"
    torch.manual_seed(0)
    proj = projector(512, [1024, 1024, 256], m["projector_bias"], m["projector_init"])
    lins = [x for x in proj if isinstance(x, nn.Linear)]
    assert [lin.bias is not None for lin in lins] == [True, True, False]
    for lin in lins:
        assert lin.weight.std().item() == pytest.approx((2 / lin.in_features) ** 0.5, rel=0.02)  # N(0, 2/fan_in)
        assert lin.bias is None or not lin.bias.any()


def test_optimizer_settings_and_parameter_split(pair):
    from barlow.model import BarlowTwins

    name, cfg, mm = pair
    p, opt = cfg["pretrain"], mm["optimizer"]
    assert (p["optimizer"], p["lars"]) == (opt["type"].lower(), "mmselfsup")
    assert (p["lr"], p["momentum"], p["weight_decay"]) == (opt["lr"], opt["momentum"], opt["weight_decay"])
    assert p["eta"] == opt.get("eta", om.LARS_DEFAULTS["eta"])
    rules = opt["paramwise_options"]
    assert all(r["lr_mult"] == p["bias_lr_ratio"] and r["weight_decay"] == 0 and r["lars_exclude"] for r in rules.values())
    with torch.device("meta"):
        model = BarlowTwins("resnet18", cfg["model"]["projector"], projector_bias=True)
    neck = {0: "fc0", 1: "bn0", 3: "fc1", 4: "bn1", 6: "fc2"}

    def upstream_name(n):  # torchvision's ResNet names equal OpenMixup's (bn1, layerX.Y.bn2, downsample.1)
        part, _, rest = n.partition(".")
        if part == "projector":
            idx, _, leaf = rest.partition(".")
            return f"neck.{neck[int(idx)]}.{leaf}"
        return f"backbone.{rest}"

    excluded = {n for n, _ in model.named_parameters() if any(re.search(k, upstream_name(n)) for k in rules)}
    _, vectors = param_groups(model, p["weight_decay"], p["bias_lr_ratio"])
    ours = {n for n, q in model.named_parameters() if any(q is v for v in vectors["params"])}
    assert excluded == ours and len(ours) == 2 * 20 + 2 * 2 + 2  # ResNet-18 BNs (+downsample) + 2 neck BNs + 2 biases


def test_openmixup_lars_applies_no_trust_ratio_and_ours_is_the_one_it_was_written_for():
    """OpenMixup's LARS (none_zero defaults False, no config sets it) steps as plain SGD + momentum; ours
    applies the trust ratio, as OpenMixup's own LARS does with none_zero=True (up to its missing 1e-8)."""
    UpLARS = om.LARS
    assert om.LARS_DEFAULTS["none_zero"] is False and "none_zero" not in om.CONFIGS[om.PRETRAIN["cifar10_r18_ep1000"]]["optimizer"]
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4, bias=False)).double()  # noqa: E731
    a, b, c = make(), make(), make()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())

    def groups(m):
        w = [q for q in m.parameters() if q.ndim > 1]
        v = [q for q in m.parameters() if q.ndim == 1]
        return [{"params": w, "weight_decay": 1e-6}, {"params": v, "weight_decay": 0.0, "lars_exclude": True}]

    theirs = UpLARS(groups(a), lr=0.5, momentum=0.9, weight_decay=1e-6)  # as configured
    sgd = torch.optim.SGD(groups(b), lr=0.5, momentum=0.9)
    intended = UpLARS(groups(c), lr=0.5, momentum=0.9, weight_decay=1e-6, none_zero=True)
    d = make()
    d.load_state_dict(a.state_dict())
    ours = LARS(param_groups(d, 1e-6, 1.0), lr=0.5, momentum=0.9, mode="mmselfsup")
    x = torch.randn(16, 6, dtype=torch.float64)
    for _ in range(3):
        for m, o in ((a, theirs), (b, sgd), (c, intended), (d, ours)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for q, s in zip(a.parameters(), b.parameters()):
        assert torch.allclose(q, s, rtol=1e-12, atol=1e-15)  # the defect: plain SGD
    for q, s in zip(c.parameters(), d.parameters()):
        assert torch.allclose(q, s, rtol=1e-6, atol=1e-12)   # the LARS we run
    assert not all(torch.allclose(q, s) for q, s in zip(a.parameters(), d.parameters()))


def test_schedule_equals_the_mmcv_cosine_hook(pair):
    name, cfg, mm = pair
    p, lr_cfg = cfg["pretrain"], {k: v for k, v in mm["lr_config"].items() if k != "policy"}
    assert mm["lr_config"]["policy"] == "CosineAnnealing" and lr_cfg["by_epoch"] is False
    assert lr_cfg["warmup"] == "linear" and lr_cfg["warmup_by_epoch"] is True
    assert (p["schedule"], p["min_lr"], p["warmup_start_ratio"], p["warmup_epochs"]) == (
        "mmcv", lr_cfg["min_lr"], lr_cfg["warmup_ratio"], lr_cfg["warmup_iters"])
    per_epoch, epochs = 24, 20  # a short run: the rule's arithmetic, not the length, is under test
    total, warmup = epochs * per_epoch, int(p["warmup_epochs"] * per_epoch)
    ratios = [1.0, p["bias_lr_ratio"]]
    for t in (0, 1, warmup - 1, warmup, total // 2, total - 1):
        theirs = [up.mmcv_cosine_lr(p["lr"] * r, t, total, lr_cfg["min_lr"], warmup, lr_cfg["warmup_ratio"]) for r in ratios]
        assert group_lrs(p, t, total, warmup, ratios) == pytest.approx(theirs, rel=1e-12), t


def test_augmentation_pair(pair):
    from barlow.augment import views_from_config

    name, cfg, mm = pair
    for view, pipe in zip(views_from_config(cfg), mm["data"]["train"]["pipelines"]):
        ops = {d["type"]: d for d in pipe}
        assert ops["RandomResizedCrop"]["size"] == view.size == cfg["data"]["image_size"] == 224
        assert ops["RandomResizedCrop"]["interpolation"] == 3  # bicubic
        assert "scale" not in ops["RandomResizedCrop"] and tuple(view.scale) == (0.08, 1.0)  # torchvision default
        (cj,) = ops["RandomAppliedTrans"]["transforms"]
        assert view.jitter == (cj["brightness"], cj["contrast"], cj["saturation"], cj["hue"])
        assert view.jitter_p == ops["RandomAppliedTrans"]["p"] and view.gray_p == ops["RandomGrayscale"]["p"]
        assert view.blur_p == ops["GaussianBlur"]["p"]
        assert view.blur_sigma == (ops["GaussianBlur"]["sigma_min"], ops["GaussianBlur"]["sigma_max"])
        assert view.solarize_p == ops["Solarization"]["p"] and view.flip_p == 0.5
        assert list(view.mean) == mm["img_norm_cfg"]["mean"] and list(view.std) == mm["img_norm_cfg"]["std"]
    # CIFAR: raw 32 px records cropped + upsampled on the batch; ImageNet-100: FFCV's rrc decoder
    assert cfg["pretrain"]["decode"] == ("simple" if name.startswith("cifar") else "rrc")
    src = mm["data"]["train"]["data_source"]
    assert src["type"] == {"cifar10_r18_ep1000": "CIFAR10", "cifar100_r18_ep1000": "CIFAR100",
                           "imagenet100_r18_ep1000": "ImageNet"}[name]


def _pass(cfg, name):
    (p,) = [p for p in cfg["probe"]["passes"] if p["name"] == name]
    return p


def test_avgpool_probe_equals_the_linear_evaluation(pair):
    name, cfg, _ = pair
    lc = om.CONFIGS[om.LINEAR[name]]
    p, opt = _pass(cfg, "avgpool"), lc["optimizer"]
    gpus, per_gpu = _per_gpu_and_gpus(om.LINEAR[name])
    assert p["batch_size"] == gpus * lc["data"]["imgs_per_gpu"] == gpus * per_gpu
    assert (p["optimizer"], p["lr"], p["momentum"], p["weight_decay"]) == (
        opt["type"].lower(), opt["lr"], opt["momentum"], opt["weight_decay"])
    assert p["nesterov"] is opt.get("nesterov", False)
    assert p["epochs"] == lc["runner"]["max_epochs"] and p["milestones"] == lc["lr_config"]["step"]
    assert lc["lr_config"]["policy"] == "step" and p["schedule"] == "step"
    head = lc["model"]["head"]
    assert head["with_avg_pool"] and head["in_channels"] == 512 and lc["model"]["backbone"]["depth"] == 18
    ops = {d["type"]: d for d in lc["data"]["train"]["pipeline"]}
    assert set(ops) == {"RandomResizedCrop", "RandomHorizontalFlip"} and ops["RandomResizedCrop"]["size"] == 224
    assert tuple(p["augment"]["scale"]) == tuple(ops["RandomResizedCrop"].get("scale", (0.08, 1.0)))
    assert p["augment"]["flip_p"] == 0.5 and p["augment"].get("jitter_p", 0) == 0
    val = {d["type"]: d for d in lc["data"]["val"]["pipeline"]}
    assert val["Resize"]["size"] == 256 and val["CenterCrop"]["size"] == 224
    if cfg["pretrain"]["decode"] == "rrc":
        assert p["eval_resize"] == val["Resize"]["size"]
    # the probes normalise with the pretraining views' mean/std: the evaluation's own
    v1 = cfg["pretrain"]["augment"]["view1"]
    assert (v1["mean"], v1["std"]) == (lc["img_norm_cfg"]["mean"], lc["img_norm_cfg"]["std"])


def test_five_feature_probe_is_the_imagenet_multihead_recipe_on_five_levels(pair):
    name, cfg, _ = pair
    mh = om.CONFIGS[om.MHEAD]
    p, opt = _pass(cfg, "five_feature"), mh["optimizer"]
    gpus, _ = _per_gpu_and_gpus(om.MHEAD)
    assert p["batch_size"] == gpus * mh["data"]["imgs_per_gpu"]
    assert (p["lr"], p["momentum"], p["weight_decay"], p["nesterov"]) == (
        opt["lr"], opt["momentum"], opt["weight_decay"], opt["nesterov"])
    assert list(opt["paramwise_options"].values()) == [{"weight_decay": 0.0}] and p["norm_weight_decay"] == 0.0
    assert p["epochs"] == mh["runner"]["max_epochs"]
    assert p["milestones"] == [s for s in mh["lr_config"]["step"] if s < mh["runner"]["max_epochs"]]
    # OpenMixup's multi-head eval: 4 features (in_indices 1-4); here all five levels, generalised pooling
    assert len(mh["model"]["head"]["in_indices"]) == 4 and p["heads"] == [f"feature{i}" for i in range(1, 6)]
    assert mh["model"]["head"]["norm_cfg"]["affine"] is False and cfg["probe"]["pooling"] == "auto"
    ops = {d["type"]: d for d in mh["data"]["train"]["pipeline"]}
    cj = ops["ColorJitter"]
    assert tuple(p["augment"]["jitter"]) == (cj["brightness"], cj["contrast"], cj["saturation"], cj["hue"])
    assert p["augment"]["jitter_p"] == 1.0
    assert p["augment"]["lighting"] == ops["Lighting"].get("alphastd", om.LIGHTING_ALPHASTD)
    assert tuple(p["augment"]["scale"]) == (0.08, 1.0) and "scale" not in ops["RandomResizedCrop"]


def test_probe_dims_of_resnet18_at_224():
    from barlow.estimate_costs import model_costs

    assert model_costs("resnet18", 224, (8192, 8192, 8192), True)["dims"] == {
        "feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216, "feature5": 8192, "avgpool": 512}


def test_imagenet100_list_is_cmc_byte_for_byte():
    import hashlib

    from barlow.convert import SUBSETS

    shipped = SUBSETS["imagenet100"].read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(shipped) + shipped).hexdigest()  # git's object id of the file
    assert blob == om.CMC_IMAGENET100_BLOB and hashlib.sha256(shipped).hexdigest() == om.CMC_IMAGENET100_SHA256
    names = shipped.decode().split()
    assert len(names) == len(set(names)) == 100 and all(re.fullmatch(r"n\d{8}", n) for n in names)
    # OpenMixup's own ImageNet-100 list is not in its repository (data/meta/ImageNet100/ comes from meta.zip)
    src = om.CONFIGS[om.PRETRAIN["imagenet100_r18_ep1000"]]["data"]["train"]["data_source"]
    assert src["list_file"] == "data/meta/ImageNet100/train.txt"
