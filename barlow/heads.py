"""The probe heads on a frozen backbone: Feature1..5 (stem, layer1..4) and AvgPool.

Feature heads: AvgPool2d to a fixed map -> BatchNorm2d(affine=False) -> flatten -> Linear
(init N(0, 0.01), bias 0). AvgPool head: global average pool -> Linear. The backbone stays in
eval mode and every head trains from the same forward pass.

Pooling. For ResNet-50 at 224 px (maps 112, 56, 28, 14, 7) we use the published table exactly:
(kernel, stride, pad) = (10,10,4) (16,8,0) (13,5,0) (8,3,0) (6,1,0). Elsewhere we keep what that
table encodes — about 9,216 pooled dimensions per level and never upsampling — and pool each level
of C channels and side H to n = min(H, round(sqrt(9216 / C))) with AdaptiveAvgPool2d(n). At
ResNet-50/224 this rule gives exactly the published output sizes 12, 6, 4, 3, 2.

With several processes the heads' BatchNorm uses the statistics of the global batch
(``GlobalBatchNorm2d``: SyncBatchNorm does not run on gloo/CPU, and the frozen backbone means its
input needs no gradient). Each head trains with its own optimizer and schedule (``HeadTrainer``).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import nn

from barlow.errors import BadInput
from barlow.model import features, level_channels

HEADS = ["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"]
PUBLISHED_MAPS = (112, 56, 28, 14, 7)
PUBLISHED_POOL = ((10, 10, 4), (16, 8, 0), (13, 5, 0), (8, 3, 0), (6, 1, 0))
TARGET_DIMS = 9216


def pooling_plan(channels: list[int], sizes: list[int], mode: str = "auto") -> list[nn.Module]:
    """One pooling module per Feature level (see the module docstring).

    ``auto``: the published table where it applies, the generalised rule elsewhere; ``published``:
    the table or an error (a protocol that promises the published features must not silently differ).
    """
    if tuple(sizes) == PUBLISHED_MAPS and channels == [64, 256, 512, 1024, 2048]:
        return [nn.AvgPool2d(k, s, p) for k, s, p in PUBLISHED_POOL]
    if mode == "published":
        raise BadInput(f"probe.pooling published: needs ResNet-50 maps {list(PUBLISHED_MAPS)} (224 px), got {sizes}; "
                       "use pooling: auto")
    return [nn.AdaptiveAvgPool2d(min(h, max(1, round(math.sqrt(TARGET_DIMS / c))))) for c, h in zip(channels, sizes)]


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across all processes.

    With one process (or none initialised) it is exactly ``nn.BatchNorm2d``. With several, each
    rank's per-channel sum, sum of squares and count are all-reduced (float64) and the batch is
    normalised with the global mean and biased variance; the running statistics are updated as
    BatchNorm2d does (momentum, unbiased variance). Its input must not need a gradient (the probes'
    backbone is frozen): the all-reduce is not differentiated through.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.requires_grad:
            raise RuntimeError("GlobalBatchNorm2d: the input needs a gradient, which the cross-process "
                               "statistics do not propagate (the probes' backbone must stay frozen)")
        c = x.shape[1]
        xd = x.detach().double()
        stats = torch.cat([xd.sum((0, 2, 3)), xd.pow(2).sum((0, 2, 3)),
                           torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)])
        dist.all_reduce(stats)
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean.pow(2)).clamp_min(0)
        if self.track_running_stats:
            m = self.momentum
            with torch.no_grad():
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
                self.num_batches_tracked.add_(1)
        shape = (1, c, 1, 1)
        out = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


class Head(nn.Module):
    def __init__(self, channels: int, pool: nn.Module | None, out_side: int, classes: int, norm: bool = True):
        super().__init__()
        self.pool = pool
        self.norm = GlobalBatchNorm2d(channels, affine=False, momentum=0.1) if norm else nn.Identity()
        self.fc = nn.Linear(channels * out_side * out_side, classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled).flatten(1))


class Probes(nn.Module):
    """The frozen backbone plus the pooling that turns its maps into the six head inputs."""

    def __init__(self, net: nn.Module, image_size: int, pooling: str = "auto"):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        with torch.no_grad():
            maps = features(self.net, torch.zeros(1, 3, image_size, image_size))
        self.channels = level_channels(self.net)
        self.sizes = [m.shape[-1] for m in maps]
        self.pools = nn.ModuleList(pooling_plan(self.channels, self.sizes, pooling))
        with torch.no_grad():
            self.out_sides = [p(m).shape[-1] for p, m in zip(self.pools, maps)]

    def dims(self) -> dict[str, int]:
        d = {f"feature{i + 1}": c * s * s for i, (c, s) in enumerate(zip(self.channels, self.out_sides))}
        return {**d, "avgpool": self.channels[-1]}

    @torch.no_grad()
    def pooled(self, x: torch.Tensor, heads: list[str]) -> dict[str, torch.Tensor]:
        maps = features(self.net, x)
        out = {}
        for i, name in enumerate(HEADS[:5]):
            if name in heads:
                out[name] = self.pools[i](maps[i])
        if "avgpool" in heads:
            out["avgpool"] = maps[-1].mean((2, 3), keepdim=True)
        return out

    def make_head(self, name: str, classes: int) -> Head:
        if name == "avgpool":
            return Head(self.channels[-1], None, 1, classes, norm=False)
        i = HEADS.index(name)
        return Head(self.channels[i], None, self.out_sides[i], classes)


@dataclasses.dataclass
class HeadTrainer:
    """One head with its own optimizer and epoch-wise schedule (step or cosine)."""

    name: str
    head: Head
    opt: torch.optim.Optimizer
    epochs: int
    milestones: list[int]
    gamma: float
    schedule: str
    base_lr: float
    model: nn.Module | None = None  # what the training step calls: the head, or DDP around it

    def set_epoch(self, epoch: int) -> None:
        if self.schedule == "cosine":
            lr = 0.5 * self.base_lr * (1 + math.cos(math.pi * epoch / self.epochs))
        else:
            lr = self.base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        for g in self.opt.param_groups:
            g["lr"] = lr

    def active(self, epoch: int) -> bool:
        return epoch < self.epochs


def make_trainers(probes: Probes, pcfg: dict, classes: int, device) -> list[HeadTrainer]:
    out = []
    for name in pcfg["heads"]:
        hp = {**pcfg, **pcfg.get("head_overrides", {}).get(name, {})}
        head = probes.make_head(name, classes).to(device)
        wd = hp["weight_decay"]
        # Norm layers get no weight decay (published: wd 1e-4 except norm); BN here has no affine
        # parameters, so this only matters for a head with an affine norm.
        groups = [{"params": [p for n, p in head.named_parameters() if not n.startswith("norm")], "weight_decay": wd},
                  {"params": [p for n, p in head.named_parameters() if n.startswith("norm")],
                   "weight_decay": hp["norm_weight_decay"]}]
        groups = [g for g in groups if g["params"]]
        if hp["optimizer"] == "sgd":
            opt = torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"])
        else:
            opt = torch.optim.AdamW(groups, lr=hp["lr"])
        out.append(HeadTrainer(name, head, opt, hp["epochs"], list(hp["milestones"]), hp["gamma"], hp["schedule"],
                               hp["lr"]))
    return out


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's (first) parameter: where a head computes."""
    return next(module.parameters()).device
