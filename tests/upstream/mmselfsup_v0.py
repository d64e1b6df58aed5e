"""What MMSelfSup 0.x and mmcv 1.x say, transcribed: the oracles of the ImageNet fidelity tests.

Sources (read at open-mmlab/mmselfsup tag v0.11.0 = 684875d09b68ae654b1d3186190a993274dcc297; every
file below is unchanged since v0.9.0 = 399b5a0d6e638328c8622e4696b09a5a30b8b8dc, the release that added
Barlow Twins; open-mmlab/mmcv tag v1.5.0 = 235c0253ab8806a2a2ee6954b4258a95358497ac, same behaviour
v1.4.2-v1.7.2). The configs are data: their merged values (mmcv.Config's ``_base_`` rule) are written
out below, key for key, as the files state them. The four pieces of behaviour the tests run — the loss
head, the LARS step, the cosine learning-rate hook and the head's pooling — are written here from
those files' algorithms (not copied), each with its file named.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

PRETRAIN_300E = "configs/selfsup/barlowtwins/barlowtwins_resnet50_8xb256-coslr-300e_in1k.py"
MHEAD_90E = "configs/benchmarks/classification/imagenet/resnet50_mhead_linear-8xb32-steplr-90e_in1k.py"
LINEAR_100E = "configs/benchmarks/classification/imagenet/resnet50_linear-8xb32-steplr-100e_in1k.py"

_NORMALIZE = {"type": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _byol_view(blur_p: float, solarize_p: float) -> list[dict]:
    """configs/selfsup/_base_/datasets/imagenet_byol.py, train_pipeline1 / train_pipeline2."""
    return [{"type": "RandomResizedCrop", "size": 224, "interpolation": 3},  # bicubic
            {"type": "RandomHorizontalFlip"},
            {"type": "RandomAppliedTrans", "p": 0.8,
             "transforms": [{"type": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}]},
            {"type": "RandomGrayscale", "p": 0.2},
            {"type": "GaussianBlur", "sigma_min": 0.1, "sigma_max": 2.0, "p": blur_p},
            {"type": "Solarization", "p": solarize_p},
            {"type": "ToTensor"}, _NORMALIZE]


_LINEAR_VAL = [{"type": "Resize", "size": 256}, {"type": "CenterCrop", "size": 224}, {"type": "ToTensor"}, _NORMALIZE]
_RN50 = {"type": "ResNet", "depth": 50, "in_channels": 3, "norm_cfg": {"type": "BN"}, "frozen_stages": 4}

CONFIGS = {
    # + _base_/models/barlowtwins.py, datasets/imagenet_byol.py, schedules/lars_coslr-200e_in1k.py,
    #   default_runtime.py (no `fp16` key anywhere: fp32)
    PRETRAIN_300E: {
        "model": {
            "type": "BarlowTwins",
            "backbone": {"type": "ResNet", "depth": 50, "in_channels": 3, "out_indices": [4],
                         "norm_cfg": {"type": "SyncBN"}, "zero_init_residual": True},
            "neck": {"type": "NonLinearNeck", "in_channels": 2048, "hid_channels": 8192, "out_channels": 8192,
                     "num_layers": 3, "with_last_bn": False, "with_last_bn_affine": False, "with_avg_pool": True,
                     "init_cfg": {"type": "Kaiming", "distribution": "uniform", "layer": ["Linear"]}},
            "head": {"type": "LatentCrossCorrelationHead", "in_channels": 8192}},
        "data": {"samples_per_gpu": 256, "workers_per_gpu": 4,
                 "train": {"type": "MultiViewDataset", "num_views": [1, 1],
                           "pipelines": [_byol_view(1.0, 0.0), _byol_view(0.1, 0.2)]}},
        "optimizer": {"type": "LARS", "lr": 1.6, "weight_decay": 1e-6, "momentum": 0.9,
                      "paramwise_options": {
                          "(bn|gn)(\\d+)?.(weight|bias)": {"weight_decay": 0, "lr_mult": 0.024, "lars_exclude": True},
                          "bias": {"weight_decay": 0, "lr_mult": 0.024, "lars_exclude": True},
                          "downsample.1": {"weight_decay": 0, "lr_mult": 0.024, "lars_exclude": True}}},
        "lr_config": {"policy": "CosineAnnealing", "by_epoch": False, "min_lr": 0.0016, "warmup": "linear",
                      "warmup_iters": 10, "warmup_ratio": 1.6e-4, "warmup_by_epoch": True},
        "runner": {"type": "EpochBasedRunner", "max_epochs": 300},
        "checkpoint_config": {"interval": 10, "max_keep_ckpts": 3},
    },
    # + _base_/models/resnet50_multihead.py, datasets/imagenet.py, schedules/sgd_steplr-100e.py
    MHEAD_90E: {
        "model": {"type": "Classification", "backbone": {**_RN50, "out_indices": [0, 1, 2, 3, 4]},
                  "head": {"type": "MultiClsHead", "pool_type": "specified", "in_indices": [0, 1, 2, 3, 4],
                           "with_last_layer_unpool": False, "backbone": "resnet50",
                           "norm_cfg": {"type": "SyncBN", "momentum": 0.1, "affine": False}, "num_classes": 1000}},
        "data": {"samples_per_gpu": 32, "workers_per_gpu": 4,
                 "train": {"pipeline": [{"type": "RandomResizedCrop", "size": 224}, {"type": "RandomHorizontalFlip"},
                                        {"type": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                                         "hue": 0.0},
                                        {"type": "ToTensor"}, {"type": "Lighting"}, _NORMALIZE]},
                 "val": {"pipeline": _LINEAR_VAL}},
        "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                      "paramwise_options": {"norm_decay_mult": 0.0}, "nesterov": True},
        "lr_config": {"policy": "step", "step": [30, 60, 90]},
        "runner": {"type": "EpochBasedRunner", "max_epochs": 90},
    },
    # + _base_/models/resnet50.py, datasets/imagenet.py, schedules/sgd_steplr-100e.py
    LINEAR_100E: {
        "model": {"type": "Classification", "backbone": {**_RN50, "out_indices": [4]},
                  "head": {"type": "ClsHead", "with_avg_pool": True, "in_channels": 2048, "num_classes": 1000}},
        "data": {"samples_per_gpu": 32, "workers_per_gpu": 4,
                 "train": {"pipeline": [{"type": "RandomResizedCrop", "size": 224}, {"type": "RandomHorizontalFlip"},
                                        {"type": "ToTensor"}, _NORMALIZE]},
                 "val": {"pipeline": _LINEAR_VAL}},
        "optimizer": {"type": "SGD", "lr": 30.0, "momentum": 0.9, "weight_decay": 0.0},
        "lr_config": {"policy": "step", "step": [60, 80]},
        "runner": {"type": "EpochBasedRunner", "max_epochs": 100},
    },
}

# mmselfsup/models/necks/nonlinear_neck.py, NonLinearNeck.__init__ defaults; layers named fc0, bn0, fc1, bn1, fc2
NONLINEAR_NECK_DEFAULTS = {"num_layers": 2, "with_bias": False, "with_last_bn": True, "with_last_bn_affine": True,
                           "with_last_bias": False, "with_avg_pool": True, "norm_cfg": {"type": "SyncBN"}}
# mmcv/cnn/utils/weight_init.py, KaimingInit.__init__ defaults
KAIMING_INIT_DEFAULTS = {"a": 0, "mode": "fan_out", "nonlinearity": "relu", "distribution": "normal"}
# mmselfsup/models/utils/multi_pooling.py, MultiPooling.POOL_PARAMS["resnet50"] / POOL_SIZES / POOL_DIMS
POOL_PARAMS = [(10, 10, 4), (16, 8, 0), (13, 5, 0), (8, 3, 0), (6, 1, 0)]  # (kernel_size, stride, padding)
POOL_SIZES = [12, 6, 4, 3, 2]
POOL_DIMS = [9216, 9216, 8192, 9216, 8192]
# mmselfsup/datasets/pipelines/transforms.py, Lighting.__init__ default
LIGHTING_ALPHASTD = 0.1
# mmselfsup/models/heads/latent_pred_head.py, LatentCrossCorrelationHead.__init__ default
HEAD_LAMBD = 0.0051
# mmselfsup/core/optimizer/optimizers.py, LARS.__init__ defaults
LARS_DEFAULTS = {"momentum": 0, "weight_decay": 0, "dampening": 0, "eta": 0.001, "nesterov": False, "eps": 1e-8}


class LatentCrossCorrelationHead(nn.Module):
    """latent_pred_head.py: per-rank ``nn.BatchNorm1d(affine=False)`` (never synced), c = bn(z1)ᵀ bn(z2)
    divided by (local batch × world size) and summed over ranks with the plain all_reduce, which
    autograd does not see; loss = Σ (c_ii − 1)² + λ Σ_{i≠j} c_ij²."""

    def __init__(self, in_channels: int, lambd: float = HEAD_LAMBD):
        super().__init__()
        self.lambd = lambd
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.bn = nn.BatchNorm1d(in_channels, affine=False)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> dict:
        c = self.bn(z1).T @ self.bn(z2) / (z1.shape[0] * self.world_size)
        if dist.is_available() and dist.is_initialized():
            with torch.no_grad():  # autograd-invisible, as the in-place c10d call upstream
                total = c.detach().clone()
                dist.all_reduce(total)
            c = c + (total - c.detach())  # the value is the sum over ranks, the gradient only this rank's share
        diag = torch.diagonal(c)
        loss = (diag - 1).pow(2).sum() + self.lambd * (c.pow(2).sum() - diag.pow(2).sum())
        return {"loss": loss}


class LARS(torch.optim.Optimizer):
    """optimizers.py LARS.step, per parameter: local = eta·‖p‖ / (‖g‖ + wd·‖p‖ + eps) (1 for a group
    with ``lars_exclude`` or where a norm is 0); d = (g + wd·p)·lr·local; buf = d at the first step,
    then buf = momentum·buf + (1 − dampening)·d; p −= buf (nesterov: d + momentum·buf)."""

    def __init__(self, params, lr, momentum=LARS_DEFAULTS["momentum"], weight_decay=LARS_DEFAULTS["weight_decay"],
                 dampening=LARS_DEFAULTS["dampening"], eta=LARS_DEFAULTS["eta"], nesterov=LARS_DEFAULTS["nesterov"],
                 eps=LARS_DEFAULTS["eps"]):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening,
                                      eta=eta, nesterov=nesterov))
        self.eps = eps

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, wd = p.grad, group["weight_decay"]
                local = 1.0
                if not group.get("lars_exclude", False):
                    w_norm, g_norm = float(p.norm()), float(g.norm())
                    if w_norm != 0 and g_norm != 0:
                        local = group["eta"] * w_norm / (g_norm + wd * w_norm + self.eps)
                d = (g + wd * p) * (local * group["lr"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d, alpha=1 - group["dampening"])
                buf = state["momentum_buffer"]
                p.sub_(d + group["momentum"] * buf if group["nesterov"] else buf)


def mmcv_cosine_lr(base_lr: float, it: int, max_iters: int, min_lr: float, warmup_iters: int,
                   warmup_ratio: float) -> float:
    """lr_updater.py with policy CosineAnnealing, by_epoch False, warmup 'linear': the regular lr is
    ``annealing_cos(base, min_lr, it / max_iters)`` = min_lr + ½(base − min_lr)(cos(π·it/max_iters) + 1);
    before ``warmup_iters`` it is multiplied by 1 − (1 − it/warmup_iters)(1 − warmup_ratio)."""
    regular = min_lr + 0.5 * (base_lr - min_lr) * (math.cos(math.pi * it / max_iters) + 1)
    if it >= warmup_iters:
        return regular
    k = (1 - it / warmup_iters) * (1 - warmup_ratio)
    return regular * (1 - k)


# configs/selfsup/barlowtwins/README.md at v0.11.0 (git blob 06e25543c27e269093645d551febd3bb5740057a, the same
# at v0.9.0, where it was added): the published rows, its lines 31-33 ("ImageNet Linear Evaluation") and 39-41
# ("ImageNet Nearest-Neighbor Classification") copied verbatim (the link's "arlowtwins" typo is upstream's).
BARLOWTWINS_README = "configs/selfsup/barlowtwins/README.md"
MMSELFSUP_V0_COMMIT = "684875d09b68ae654b1d3186190a993274dcc297"  # tag v0.11.0
README_LINEAR_EVAL = [
    '| Self-Supervised Config                                                                                                                                                       | Feature1 | Feature2 | Feature3 | Feature4 | Feature5 | AvgPool |',
    '| ---------------------------------------------------------------------------------------------------------------------------------------------------------------------------- | -------- | -------- | -------- | -------- | -------- | ------- |',
    '| [barlowtwins_resnet50_8xb256-coslr-300e_in1k](https://github.com/open-mmlab/mmselfsup/blob/master/configs/selfsup/arlowtwins/barlowtwins_resnet50_8xb256-coslr-300e_in1k.py) | 15.51    | 33.98    | 45.96    | 61.90    | 71.01    | 71.66   |',
]
README_KNN = [
    '| Self-Supervised Config                                                                                                                                                       | k=10 | k=20 | k=100 | k=200 |',
    '| ---------------------------------------------------------------------------------------------------------------------------------------------------------------------------- | ---- | ---- | ----- | ----- |',
    '| [barlowtwins_resnet50_8xb256-coslr-300e_in1k](https://github.com/open-mmlab/mmselfsup/blob/master/configs/selfsup/arlowtwins/barlowtwins_resnet50_8xb256-coslr-300e_in1k.py) | 63.6 | 63.8 | 62.7  | 61.9  |',
]
