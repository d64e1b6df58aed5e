"""What OpenMixup says about Barlow Twins on CIFAR-10, CIFAR-100 and ImageNet-100, transcribed: the oracles
of tests/test_presets_openmixup.py (see README.md; nothing of OpenMixup is copied into this repository).

Sources, read at Westlake-AI/openmixup 37e1372446ab35c03fcf77302539bd4a5bee47eb (main, 2025-10-15). The
configs are data: their merged values (mmcv.Config's ``_base_`` rule) are written out below, key for key,
as the files state them (keys the tests do not use — workers, logging, checkpoints — left out). The one
piece of behaviour the tests run, OpenMixup's LARS step, is written from its file's algorithm.
OpenMixup's LatentCrossCorrelationHead (openmixup/models/heads/latent_pred_head.py) is MMSelfSup's
algorithm line for line (per-rank ``BatchNorm1d(affine=False)``, ``div_(N × world_size)``, plain
``all_reduce``): mmselfsup_v0.LatentCrossCorrelationHead stands for both.
"""
from __future__ import annotations

import torch

COMMIT = "37e1372446ab35c03fcf77302539bd4a5bee47eb"

PRETRAIN = {
    "cifar10_r18_ep1000": "configs/selfsup/barlowtwins/cifar10/r18_8xb256_cos_lr1_6_fp16_ep1000.py",
    "cifar100_r18_ep1000": "configs/selfsup/barlowtwins/cifar100/r18_8xb256_cos_lr1_6_fp16_ep1000.py",
    "imagenet100_r18_ep1000": "configs/selfsup/barlowtwins/imagenet100/r18_8xb64_accu4_cos_lr1_6_fp16_ep1000.py",
}
LINEAR = {
    "cifar10_r18_ep1000": "configs/benchmarks/classification/cifar10/r18_linear_sz224_4xb64_step_ep100.py",
    "cifar100_r18_ep1000": "configs/benchmarks/classification/cifar100/r18_linear_sz224_4xb64_step_ep100.py",
    "imagenet100_r18_ep1000": "configs/benchmarks/classification/imagenet100/r18_linear_sz224_4xb64_step_ep100.py",
}
MHEAD = "configs/benchmarks/classification/imagenet/r50_mhead_sz224_4xb64_step_ep90.py"

CIFAR_NORM = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.201]}
IMAGENET_NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _byol_view(blur_p: float, solarize_p: float) -> list[dict]:
    """configs/selfsup/_base_/datasets/{cifar10/byol_sz224_bs256,imagenet/byol_sz224_bs64}.py, train_pipeline1/2
    (prefetch True: ToTensor + Normalize(img_norm_cfg) happen in the prefetching loader)."""
    return [{"type": "RandomResizedCrop", "size": 224, "interpolation": 3},  # bicubic
            {"type": "RandomHorizontalFlip"},
            {"type": "RandomAppliedTrans", "p": 0.8,
             "transforms": [{"type": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}]},
            {"type": "RandomGrayscale", "p": 0.2},
            {"type": "GaussianBlur", "sigma_min": 0.1, "sigma_max": 2.0, "p": blur_p},
            {"type": "Solarization", "p": solarize_p}]


# configs/selfsup/_base_/models/barlowtwins/r18.py
_R18_BARLOW = {
    "type": "BarlowTwins",
    "backbone": {"type": "ResNet", "depth": 18, "num_stages": 4, "out_indices": [3], "norm_cfg": {"type": "SyncBN"},
                 "style": "pytorch"},
    "neck": {"type": "NonLinearNeck", "in_channels": 512, "hid_channels": 8192, "out_channels": 8192, "num_layers": 3,
             "with_bias": True, "with_last_bn": False, "with_last_bn_affine": False, "with_avg_pool": True},
    "head": {"type": "LatentCrossCorrelationHead", "in_channels": 8192},
}
_EXCLUDE = {"weight_decay": 0.0, "lr_mult": 0.024, "lars_exclude": True}


def _pretrain(source: dict, per_gpu: int, update_interval: int, norm: dict) -> dict:
    """The three pretraining configs: identical but for the dataset base and update_interval."""
    return {
        "model": _R18_BARLOW,
        "data": {"imgs_per_gpu": per_gpu, "train": {"data_source": source,
                                                    "pipelines": [_byol_view(1.0, 0.0), _byol_view(0.1, 0.2)]}},
        "img_norm_cfg": norm,
        "update_interval": update_interval,
        "optimizer": {"type": "LARS", "lr": 1.6, "momentum": 0.9, "weight_decay": 1e-6,
                      "paramwise_options": {"(bn|ln|gn)(\\d+)?.(weight|bias)": _EXCLUDE, "bias": _EXCLUDE,
                                            "downsample.1": {**_EXCLUDE, "weight_decay": 0}}},
        "use_fp16": True,
        "fp16": {"type": "mmcv", "loss_scale": "dynamic"},
        "optimizer_config": {"update_interval": update_interval, "grad_clip": None},
        "lr_config": {"policy": "CosineAnnealing", "by_epoch": False, "min_lr": 0.0016, "warmup": "linear",
                      "warmup_iters": 10, "warmup_by_epoch": True, "warmup_ratio": 1.6e-4},
        "runner": {"type": "EpochBasedRunner", "max_epochs": 1000},
    }


def _linear(source_train: dict, source_val: dict, lr: float, classes: int, crop: dict, norm: dict) -> dict:
    """The three r18_linear_sz224_4xb64_step_ep100.py (+ _base_/models/r18.py, datasets/*_sz224_4xbs64.py)."""
    return {
        "model": {"type": "Classification",
                  "backbone": {"type": "ResNet", "depth": 18, "num_stages": 4, "out_indices": [3], "frozen_stages": 4,
                               "style": "pytorch"},
                  "head": {"type": "ClsHead", "with_avg_pool": True, "in_channels": 512, "num_classes": classes}},
        "data": {"imgs_per_gpu": 64,
                 "train": {"data_source": source_train, "pipeline": [crop, {"type": "RandomHorizontalFlip"}]},
                 "val": {"data_source": source_val,
                         "pipeline": [{"type": "Resize", "size": 256, "interpolation": 3},
                                      {"type": "CenterCrop", "size": 224}, {"type": "ToTensor"},
                                      {"type": "Normalize", **norm}]}},
        "img_norm_cfg": norm,
        "optimizer": {"type": "SGD", "lr": lr, "momentum": 0.9, "weight_decay": 0.0},
        "lr_config": {"policy": "step", "step": [60, 80]},
        "runner": {"type": "EpochBasedRunner", "max_epochs": 100},
    }


_CIFAR_CROP = {"type": "RandomResizedCrop", "size": 224, "scale": [0.2, 1], "interpolation": 3}
_IMAGENET_CROP = {"type": "RandomResizedCrop", "size": 224, "interpolation": 3}

CONFIGS = {
    # + datasets/cifar10/byol_sz224_bs256.py ("imgs_per_gpu=256"), default_runtime.py
    PRETRAIN["cifar10_r18_ep1000"]: _pretrain(
        {"split": "train", "return_label": False, "type": "CIFAR10", "root": "data/cifar10/"}, 256, 1, CIFAR_NORM),
    # + datasets/cifar100/byol_sz224_bs256.py (-> cifar10/byol_sz224_bs256.py: the same pipelines and norm)
    PRETRAIN["cifar100_r18_ep1000"]: _pretrain(
        {"split": "train", "return_label": False, "type": "CIFAR100", "root": "data/cifar100/"}, 256, 1, CIFAR_NORM),
    # + datasets/imagenet100/byol_sz224_bs64.py (-> imagenet/byol_sz224_bs64.py: "imgs_per_gpu=64")
    PRETRAIN["imagenet100_r18_ep1000"]: _pretrain(
        {"list_file": "data/meta/ImageNet100/train.txt", "root": "data/ImageNet/train", "type": "ImageNet",
         "return_label": False}, 64, 4, IMAGENET_NORM),
    LINEAR["cifar10_r18_ep1000"]: _linear(
        {"split": "train", "type": "CIFAR10", "root": "data/cifar10/"},
        {"split": "test", "type": "CIFAR10", "root": "data/cifar10/"}, 0.1, 10, _CIFAR_CROP, CIFAR_NORM),
    LINEAR["cifar100_r18_ep1000"]: _linear(  # datasets/cifar100_sz224_4xbs64.py keeps CIFAR-10's mean/std
        {"split": "train", "type": "CIFAR100", "root": "data/cifar100/"},
        {"split": "test", "type": "CIFAR100", "root": "data/cifar100/"}, 1.0, 100, _CIFAR_CROP, CIFAR_NORM),
    LINEAR["imagenet100_r18_ep1000"]: _linear(  # datasets/imagenet100_sz224_4xbs64.py -> imagenet_sz224_4xbs64.py
        {"list_file": "data/meta/ImageNet100/train_labeled.txt", "root": "data/ImageNet/train", "type": "ImageNet"},
        {"list_file": "data/meta/ImageNet100/val_labeled.txt", "root": "data/ImageNet/val/", "type": "ImageNet"},
        30.0, 100, _IMAGENET_CROP, IMAGENET_NORM),
    # + _base_/models/r50_multihead.py, datasets/imagenet_color_sz224_4xbs64.py (prefetch False)
    MHEAD: {
        "model": {"type": "Classification",
                  "backbone": {"type": "ResNet", "depth": 50, "num_stages": 4, "out_indices": [0, 1, 2, 3],
                               "norm_cfg": {"type": "BN"}, "frozen_stages": 4, "style": "pytorch"},
                  "head": {"type": "MultiClsHead", "pool_type": "specified", "in_indices": [1, 2, 3, 4],
                           "with_last_layer_unpool": False, "backbone": "resnet50",
                           "norm_cfg": {"type": "SyncBN", "momentum": 0.1, "affine": False}, "num_classes": 1000}},
        "data": {"imgs_per_gpu": 64,
                 "train": {"pipeline": [_IMAGENET_CROP, {"type": "RandomHorizontalFlip"},
                                        {"type": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                                         "hue": 0.0},
                                        {"type": "ToTensor"}, {"type": "Lighting"},
                                        {"type": "Normalize", **IMAGENET_NORM}]}},
        "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True,
                      "paramwise_options": {"(bn|ln|gn)(\\d+)?.(weight|bias)": {"weight_decay": 0.0}}},
        "lr_config": {"policy": "step", "step": [30, 60, 90]},
        "runner": {"type": "EpochBasedRunner", "max_epochs": 90},
    },
}

# openmixup/models/backbones/resnet_mmcls.py, ResNet.__init__ defaults (init_weights: conv kaiming_init,
# BN constant 1/0, zero_init_residual -> last BN of each block 0)
RESNET_DEFAULTS = {"zero_init_residual": True, "deep_stem": False, "avg_down": False, "norm_eval": False}
# openmixup/models/necks/mlp_necks.py, NonLinearNeck.__init__ defaults; layers fc0, bn0, fc1, bn1, fc2
NONLINEAR_NECK_DEFAULTS = {"num_layers": 2, "with_bias": False, "with_last_bn": True, "with_last_bn_affine": True,
                           "with_last_bias": False, "with_avg_pool": True, "norm_cfg": {"type": "SyncBN"}}
# openmixup/models/selfsup/barlowtwins.py, BarlowTwins.init_weights: self.neck.init_weights(init_linear='kaiming');
# mlp_necks.py _init_weights(init_linear='kaiming'): Linear -> kaiming_init(m, mode='fan_in', nonlinearity='relu')
# with mmcv's kaiming_init defaults a=0, bias=0, distribution='normal'
NECK_LINEAR_INIT = {"a": 0, "mode": "fan_in", "nonlinearity": "relu", "bias": 0, "distribution": "normal"}
# openmixup/models/heads/latent_pred_head.py, LatentCrossCorrelationHead.__init__ default
HEAD_LAMBD = 0.0051
# openmixup/datasets/pipelines/transforms.py, Lighting.__init__ default
LIGHTING_ALPHASTD = 0.1
# openmixup/core/hooks/optimizer_hook.py, Fp16OptimizerHook.after_train_iter (torch >= 1.6) and DistOptimizerHook:
# runner.outputs['loss'] /= self.update_interval; backward every iteration; step every update_interval iterations
ACCUMULATION = "each micro-batch's own loss / update_interval, gradients summed, one step per update_interval"
# openmixup/core/optimizers/lars.py, LARS.__init__ defaults; none_zero=False since 4575a8b (2024-06-19)
LARS_DEFAULTS = {"momentum": 0, "dampening": 0, "weight_decay": 0, "eta": 0.001, "nesterov": False, "none_zero": False}
LARS_NO_TRUST_SINCE = "4575a8b60d70fce789b8918c72695c3cb3e87812"


class LARS(torch.optim.Optimizer):
    """lars.py LARS.step, per parameter: local = 1; only with ``none_zero`` (and a non-zero gradient) is
    local = eta·‖p‖ / (‖g‖ + wd·‖p‖) (no epsilon), and never for a ``lars_exclude`` group;
    d = (g + wd·p)·local·lr; buf = d at the first step, then momentum·buf + (1 − dampening)·d; p −= buf
    (nesterov: d + momentum·buf). With the default none_zero=False this is SGD with momentum."""

    def __init__(self, params, lr, momentum=LARS_DEFAULTS["momentum"], dampening=LARS_DEFAULTS["dampening"],
                 weight_decay=LARS_DEFAULTS["weight_decay"], eta=LARS_DEFAULTS["eta"],
                 nesterov=LARS_DEFAULTS["nesterov"], none_zero=LARS_DEFAULTS["none_zero"]):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, eta=eta))
        self.none_zero = none_zero

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                local = 1.0
                if not group.get("lars_exclude", False) and self.none_zero:
                    w_norm, g_norm = float(p.norm()), float(g.norm())
                    if g_norm != 0:
                        local = group["eta"] * w_norm / (g_norm + wd * w_norm)
                d = (g + wd * p) * (local * group["lr"])
                if group["momentum"] != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(d, alpha=1 - group["dampening"])
                    buf = state["momentum_buffer"]
                    d = d.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.sub_(d)


# HobbitLong/CMC imagenet100.txt (commit bc687a26de7ae350d98f671d25d164b65336b8c2, 2020-05-22): its git blob id
# and sha256. barlow/datasets/imagenet100.txt must be that file. OpenMixup's own list (data/meta/ImageNet100/
# train.txt, val.txt) is not in its repository: docs/en/install.md sends users to the meta.zip release asset.
CMC_IMAGENET100_BLOB = "6dccf9be4f2f5efe33d0f5ae03a20bc438d3e658"
CMC_IMAGENET100_SHA256 = "79f3f1552ccc478ce24bd934b4573625db584ddc1f4643ae23c994a94cb11397"
