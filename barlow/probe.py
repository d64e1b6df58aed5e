"""Linear probes on a frozen backbone: Feature1..5 (stem, layer1..4) and AvgPool.

Feature heads: AvgPool2d to a fixed map -> BatchNorm2d(affine=False) -> flatten -> Linear
(init N(0, 0.01), bias 0). AvgPool head: global average pool -> Linear. The backbone stays in
eval mode and every head trains from the same forward pass.

Pooling. For ResNet-50 at 224 px (maps 112, 56, 28, 14, 7) we use the published table exactly:
(kernel, stride, pad) = (10,10,4) (16,8,0) (13,5,0) (8,3,0) (6,1,0). Elsewhere we keep what that
table encodes — about 9,216 pooled dimensions per level and never upsampling — and pool each level
of C channels and side H to n = min(H, round(sqrt(9216 / C))) with AdaptiveAvgPool2d(n). At
ResNet-50/224 this rule gives exactly the published output sizes 12, 6, 4, 3, 2.

A probe run is a list of *passes*. Each pass has its train/eval augmentation and trains some heads,
each with its own optimizer and schedule. ``cached: true`` extracts the (pooled) frozen features once
and trains on them (valid only without train augmentation: the fast single-pass protocol); otherwise
the backbone runs every epoch, as in the published protocols.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn

from barlow.atomic import write_json
from barlow.checkpoint import load_backbone
from barlow.errors import BadInput
from barlow.ffcv_import import import_ffcv
from barlow.loader import beton_length, make_loader, split_batch
from barlow.model import backbone as make_backbone
from barlow.model import features, level_channels
from barlow.provenance import git_commit

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


class Head(nn.Module):
    def __init__(self, channels: int, pool: nn.Module | None, out_side: int, classes: int, norm: bool = True):
        super().__init__()
        self.pool = pool
        self.norm = nn.BatchNorm2d(channels, affine=False, momentum=0.1) if norm else nn.Identity()
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
        wd = hp.get("weight_decay", 0.0)
        # Norm layers get no weight decay (published: wd 1e-4 except norm); BN here has no affine
        # parameters, so this only matters for a head with an affine norm.
        groups = [{"params": [p for n, p in head.named_parameters() if not n.startswith("norm")], "weight_decay": wd},
                  {"params": [p for n, p in head.named_parameters() if n.startswith("norm")],
                   "weight_decay": hp.get("norm_weight_decay", 0.0)}]
        groups = [g for g in groups if g["params"]]
        if hp["optimizer"] == "sgd":
            opt = torch.optim.SGD(groups, lr=hp["lr"], momentum=hp.get("momentum", 0.9), nesterov=hp.get("nesterov", False))
        else:
            opt = torch.optim.AdamW(groups, lr=hp["lr"])
        out.append(HeadTrainer(name, head, opt, hp["epochs"], list(hp.get("milestones", [])), hp.get("gamma", 0.1),
                               hp.get("schedule", "step"), hp["lr"]))
    return out


def eval_view(size: int, view: dict, mean, std):
    from barlow.augment import ViewAugment

    base = dict(size=size, crop=False, flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0,
                lighting=0.0, mean=tuple(mean), std=tuple(std))
    return ViewAugment.from_dict({**base, **view})


def train_view(size: int, view: dict, mean, std):
    from barlow.augment import ViewAugment

    base = dict(size=size, crop=True, scale=(0.08, 1.0), flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                solarize_p=0.0, lighting=0.0, mean=tuple(mean), std=tuple(std))
    return ViewAugment.from_dict({**base, **view})


def run_probes(cfg: dict, backbone_path: str | Path, train: str | Path, val: str | Path, out: str | Path,
               env=None, log=print) -> dict:
    """Train every pass's heads and write top-1 (val) per head to ``out`` (JSON)."""
    from barlow.augment import BatchAugment

    t0 = time.time()
    device = env.device if env is not None else "cpu"
    m, pc = cfg["model"], cfg["probe"]
    blob = load_backbone(backbone_path, m["arch"])
    net = make_backbone(m["arch"])
    net.load_state_dict(blob["state_dict"])
    size = cfg["data"].get("image_size", 224)
    probes = Probes(net, size, pc.get("pooling", "auto")).to(device)
    v1 = cfg["pretrain"].get("augment", {}).get("view1", {})
    mean, std = v1.get("mean", (0.485, 0.456, 0.406)), v1.get("std", (0.229, 0.224, 0.225))
    n_train, n_val = beton_length(train), beton_length(val)
    limit = pc.get("limit_train")
    train_idx = list(range(min(n_train, limit))) if limit else None
    classes = _num_classes(train, val)
    seed, workers = pc.get("seed", 0), pc.get("workers", 2)
    torch.manual_seed(seed)
    results, dims = {}, probes.dims()
    for pcfg in pc["passes"]:
        trainers = make_trainers(probes, pcfg, classes, device)
        tr_aug = BatchAugment(train_view(size, pcfg.get("augment", {}), mean, std)).to(device)
        ev_aug = BatchAugment(eval_view(size, pcfg.get("eval_augment", {}), mean, std)).to(device)
        heads = [t.name for t in trainers]
        decode = "simple" if cfg["pretrain"].get("decode", "simple") == "simple" else "rrc"
        eval_decode = "simple" if decode == "simple" else "center"
        if pcfg.get("cached"):
            log(f"[{pcfg['name']}] extracting frozen features once for {heads}")
            t_ex = time.time()
            feats_tr, y_tr = _extract(probes, train, heads, ev_aug, pcfg, workers, seed, train_idx, device, eval_decode, size)
            feats_va, y_va = _extract(probes, val, heads, ev_aug, pcfg, workers, seed, None, device, eval_decode, size)
            log(f"[{pcfg['name']}] extracted {len(y_tr)} train + {len(y_va)} val in {time.time() - t_ex:.0f} s")
            _fit_cached(trainers, feats_tr, y_tr, pcfg["batch_size"], seed, log)
            for t in trainers:
                results[t.name] = _accuracy(t.head, feats_va[t.name], y_va)
        else:
            loader = make_loader(train, pcfg["batch_size"], train=True, workers=workers, seed=seed, decode=decode,
                                 size=size, indices=train_idx, device=device)
            for epoch in range(max(t.epochs for t in trainers)):
                active = [t for t in trainers if t.active(epoch)]
                for t in active:
                    t.set_epoch(epoch)
                    t.head.train()
                loader.next_epoch = epoch
                it = iter(loader)
                try:
                    for i, batch in enumerate(it):
                        (x,), y = split_batch(batch, 1)
                        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 100_003 + i)
                        pooled = probes.pooled(tr_aug(x, g), [t.name for t in active])
                        for t in active:
                            _sgd_step(t, pooled[t.name], y.long())
                finally:
                    it.close()
                log(f"[{pcfg['name']}] epoch {epoch + 1}/{max(t.epochs for t in trainers)} done")
            feats_va, y_va = _extract(probes, val, heads, ev_aug, pcfg, workers, seed, None, device, eval_decode, size)
            for t in trainers:
                results[t.name] = _accuracy(t.head, feats_va[t.name], y_va)
        log(f"[{pcfg['name']}] top-1: " + ", ".join(f"{k} {results[k]:.2f}" for k in heads))
    summary = {
        "protocol": pc["protocol"], "top1": results, "dims": {k: dims[k] for k in results},
        "backbone": str(backbone_path), "pretrain_epochs": blob.get("epochs"), "pretrain_steps": blob.get("steps"),
        "pretrain_wall_s": blob.get("wall_s"), "pretrain_commit": blob.get("commit"),
        "pretrain_precision": blob.get("precision"), "init": cfg["pretrain"]["init"],
        "train_images": len(train_idx) if train_idx else n_train, "val_images": n_val, "seed": seed,
        "probe_wall_s": round(time.time() - t0, 1), "probe_commit": git_commit(), "config": cfg,
    }
    write_json(out, summary)
    return summary


def _num_classes(train, val) -> int:
    import_ffcv()
    from ffcv.reader import Reader

    def labels(path):
        r = Reader(str(path))
        return r.metadata[f"f{r.field_names.index('label')}"]

    tr, va = labels(train), labels(val)
    # The converter writes a summary beside each .beton; where both exist, their classes must agree.
    summaries = [Path(p).with_suffix(".json") for p in (train, val)]
    if all(p.is_file() for p in summaries):
        import json

        a, b = (json.loads(p.read_text()).get("classes") for p in summaries)
        if a != b:
            raise BadInput(f"{val}: its classes ({len(b)}: {', '.join(b[:3])}...) differ from {train}'s "
                           f"({len(a)}: {', '.join(a[:3])}...); train and val must come from one dataset — reconvert")
    if va.max() > tr.max():
        raise BadInput(f"{val}: has label {int(va.max())} but {train} only goes to {int(tr.max())}; "
                       "train and val come from different datasets — reconvert both")
    return int(tr.max()) + 1


@torch.no_grad()
def _extract(probes, path, heads, aug, pcfg, workers, seed, indices, device, decode, size):
    # Variable-size images: resize to eval_resize, center crop `size` (published: 256 -> 224).
    ratio = size / pcfg.get("eval_resize", round(size * 256 / 224))
    loader = make_loader(path, pcfg["batch_size"], train=False, workers=workers, seed=seed, decode=decode, size=size,
                         indices=indices, device=device, drop_last=False, center_ratio=ratio)
    # Written into preallocated tensors: a list of per-batch chunks plus their torch.cat would
    # hold every feature twice at the end (measured: ~675 MiB more peak at 20k Fashion-MNIST images).
    total = len(loader.indices)
    feats: dict[str, torch.Tensor] = {}
    ys = torch.empty(total, dtype=torch.long)
    at = 0
    it = iter(loader)
    try:
        for batch in it:
            (x,), y = split_batch(batch, 1)
            n = len(y)
            for k, v in probes.pooled(aug(x), heads).items():
                if k not in feats:
                    dtype = torch.float16 if device == "cpu" else v.dtype
                    feats[k] = torch.empty((total, *v.shape[1:]), dtype=dtype)
                feats[k][at:at + n] = v
            ys[at:at + n] = y.long().cpu()
            at += n
    finally:
        it.close()
    if at != total:
        raise RuntimeError(f"{path}: the loader gave {at} images, expected {total}")
    return feats, ys


def _sgd_step(t: HeadTrainer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(t.head(x.float()), y)
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    t.opt.step()


def _fit_cached(trainers, feats, y, batch_size, seed, log):
    """Train heads on cached frozen features.

    The features never change, so each head's BatchNorm gets the statistics of the whole train
    set once (the value its running averages would converge to) and stays in eval mode; a step
    is then one gather and one small matmul per head, instead of re-normalising every batch.
    """
    t0 = time.time()
    for t in trainers:
        if isinstance(t.head.norm, nn.BatchNorm2d):
            x = feats[t.name]
            mean = torch.zeros(x.shape[1], dtype=torch.float64)
            sq = torch.zeros(x.shape[1], dtype=torch.float64)
            for i in range(0, len(x), 1024):  # 4096 rows: float64 chunk + square of Feature1 = 0.6 GB
                chunk = x[i:i + 1024].double()
                mean += chunk.sum((0, 2, 3))
                sq += chunk.pow(2).sum((0, 2, 3))
            count = len(x) * x.shape[2] * x.shape[3]
            mean /= count
            t.head.norm.running_mean.copy_(mean.float())
            t.head.norm.running_var.copy_((sq / count - mean**2).clamp_min(0).float())
        t.head.eval()
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    epochs = max(t.epochs for t in trainers)
    for epoch in range(epochs):
        active = [t for t in trainers if t.active(epoch)]
        for t in active:
            t.set_epoch(epoch)
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - batch_size + 1, batch_size):
            idx = perm[s:s + batch_size]
            yb = y[idx]
            for t in active:
                _sgd_step(t, feats[t.name][idx], yb)
        if (epoch + 1) % max(1, epochs // 5) == 0 or epoch + 1 == epochs:
            log(f"cached probes: epoch {epoch + 1}/{epochs} ({time.time() - t0:.0f} s)")


@torch.no_grad()
def _accuracy(head: Head, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> float:
    head.eval()
    correct = sum(int((head(x[i:i + batch].float()).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return round(100.0 * correct / len(y), 2)
