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

Devices. The heads live on the compute device (``env.device``); cached features stay in host
memory as float16 (ImageNet's Feature1..5 would need ~245 GB in float32), and every consumer
(``_sgd_step``, ``_correct``, the BN statistics of ``_fit_cached``) moves its batch to the heads'
device itself, so a loader may deliver batches on any device. tests/test_probe.py runs the whole
probe with compute on PyTorch's ``meta`` device and CPU batches: a missing move raises there.

Several processes (``env.world > 1``, one per device) split every global batch: the order of an
epoch is the global permutation FFCV's RANDOM order gives one process (numpy, seeded seed +
epoch), and rank r takes its positions r, r + world, ... (FFCV's distributed sampler over that
order), so each global batch is the union of the ranks' batches and a run's heads do not depend
on the number of processes (up to float rounding). Heads are wrapped in DistributedDataParallel;
their BatchNorm uses the statistics of the global batch (``GlobalBatchNorm2d``: SyncBatchNorm does
not run on gloo/CPU, and the frozen backbone means its input needs no gradient); evaluation is
sharded too and the correct counts summed. Only rank 0 writes files.

Resuming. Rank 0 writes ``<output stem>.checkpoint.pt`` beside the output (every
``probe.checkpoint_every_steps`` optimizer steps, at each epoch end and after each pass): heads,
optimizers, the step within the pass, the generator of the cached protocol's order, the torch RNG
state at the pass start, and the finished passes' results. A rerun resumes from it and ends with
the very heads of an unbroken run (tests/test_probe_resume.py); the checkpoint is deleted once the
output is written. A checkpoint of another config or other backbone weights is refused.

kNN. A pass with the AvgPool head also reports the weighted kNN top-1 (``barlow.knn``: cosine,
T = 0.07, k = 20 and 200) of the val AvgPool features against the (used) train ones, unaugmented:
the cached features themselves, or one extra eval-view extraction of the train set after an
augmented pass. With several processes each rank all-gathers the others' shards and computes it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from barlow.atomic import save_torch, write_json
from barlow.augment import views_from_config
from barlow.checkpoint import load_backbone
from barlow.config import complete, with_defaults
from barlow import distributed
from barlow.distributed import Env
from barlow.errors import BadInput
from barlow.identity import first_difference, learning_config
from barlow.ffcv_import import import_ffcv
from barlow.knn import KS, TEMPERATURE, knn_top1
from barlow.loader import beton_length, make_loader, split_batch
from barlow.model import backbone as make_backbone
from barlow.model import features, level_channels
from barlow.provenance import git_commit

HEADS = ["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"]
PUBLISHED_MAPS = (112, 56, 28, 14, 7)
PUBLISHED_POOL = ((10, 10, 4), (16, 8, 0), (13, 5, 0), (8, 3, 0), (6, 1, 0))
TARGET_DIMS = 9216
FP16_MAX = 65504.0


def checkpoint_path(out: str | Path) -> Path:
    """The resume checkpoint of the probe run writing ``out`` (one per output: passes run side by side)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.checkpoint.pt")


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
               env: Env | None = None, log=print) -> dict:
    """Train every pass's heads and write top-1 (val) per head to ``out`` (JSON).

    ``env`` (rank, world, local_rank, device; default: one process on the CPU) sets where the
    heads compute and how the data is split; with ``world > 1`` the process group must exist
    (``barlow.distributed.setup``). On the ``meta`` device (the device test) top-1 is NaN.
    Resumes from ``checkpoint_path(out)`` when a killed run left one.
    """
    from barlow.augment import BatchAugment

    t0 = time.time()
    env = env or Env()
    device = torch.device(env.device)
    # FFCV's ToDevice only where it pays (CUDA); any other device gets CPU batches that the
    # consumers move (which is also what the meta-device test exercises).
    loader_device = env.device if device.type == "cuda" else "cpu"
    if not env.main:
        log = _quiet
    out = Path(out)
    cfg = complete(cfg)
    m, pc = cfg["model"], cfg["probe"]
    if device.type == "cuda":
        distributed.fp32_math(cfg["pretrain"]["tf32"])  # the backbone's forward computes as pretraining's did
    for i, pcfg in enumerate(pc["passes"]):
        if pcfg["batch_size"] % env.world:
            raise BadInput(f"probe.passes[{i}].batch_size {pcfg['batch_size']}: not divisible by the {env.world} "
                           f"processes (nodes x devices); choose a multiple of {env.world}")
    weights = _load_weights(cfg, backbone_path)
    blob = weights.info
    net = make_backbone(m["arch"])
    net.load_state_dict(weights.state_dict)
    size = cfg["data"]["image_size"]
    probes = Probes(net, size, pc["pooling"]).to(device)
    v1 = views_from_config(cfg)[0]  # the probes normalise as pretraining did
    mean, std = v1.mean, v1.std
    n_train, n_val = beton_length(train), beton_length(val)
    limit = pc["limit_train"]
    train_idx = list(range(min(n_train, limit))) if limit else None
    n_used = len(train_idx) if train_idx else n_train
    classes = _num_classes(train, val)
    seed, workers = pc["seed"], pc["workers"]
    ckpt = _Checkpointer(checkpoint_path(out), cfg, backbone_path, env, pc["checkpoint_every_steps"], sha=weights.sha256)
    torch.manual_seed(seed)
    results, dims = {}, probes.dims()
    knn = None  # the kNN result of the pass with the AvgPool head
    state = ckpt.load()
    first = 0
    if state is not None:
        results, first, knn = dict(state["results"]), state["pass"], state.get("knn")
        torch.set_rng_state(state["rng"])
        ckpt.wall_before = state.get("wall_s", 0.0)
        log(f"resuming the probes from {ckpt.path}: pass {first + 1}/{len(pc['passes'])}, step {state['step']}")
    for p_i, pcfg in enumerate(pc["passes"]):
        if p_i < first:
            continue
        rng_at_start = torch.get_rng_state()  # head init draws from it: a resumed pass re-draws the same
        trainers = make_trainers(probes, pcfg, classes, device)
        resume = state if state is not None and state["pass"] == p_i and state.get("heads") else None
        if resume is not None:
            for t in trainers:
                t.head.load_state_dict(resume["heads"][t.name])
                t.opt.load_state_dict(resume["optimizers"][t.name])
        for t in trainers:
            t.model = distributed.wrap(t.head, env)  # (GlobalBatchNorm2d keeps the ranks' running stats equal)

        def save(step: int, steps_per_epoch: int, gen=None, trainers=trainers, p_i=p_i, rng=rng_at_start) -> None:
            """Checkpoint after optimizer step ``step`` of this pass if it is due (every N steps, epoch end)."""
            if step % ckpt.every == 0 or step % steps_per_epoch == 0:
                ckpt.save(p_i, results, rng, trainers, step, gen, t0, knn)

        tr_aug = BatchAugment(train_view(size, pcfg.get("augment", {}), mean, std)).to(device)
        ev_aug = BatchAugment(eval_view(size, pcfg.get("eval_augment", {}), mean, std)).to(device)
        heads = [t.name for t in trainers]
        decode = "simple" if cfg["pretrain"]["decode"] == "simple" else "rrc"
        eval_decode = "simple" if decode == "simple" else "center"
        extract = dict(heads=heads, aug=ev_aug, pcfg=pcfg, workers=workers, seed=seed, env=env,
                       loader_device=loader_device, decode=eval_decode, size=size)  # all but path, indices
        if pcfg["cached"]:
            log(f"[{pcfg['name']}] extracting frozen features once for {heads}")
            t_ex = time.time()
            feats_tr, y_tr = _extract(probes, train, indices=train_idx, **extract)
            feats_va, y_va = _extract(probes, val, indices=None, **extract)
            log(f"[{pcfg['name']}] extracted {n_used} train + {n_val} val in {time.time() - t_ex:.0f} s")
            _fit_cached(trainers, feats_tr, y_tr, pcfg["batch_size"], seed, log, env=env, n=n_used,
                        resume=resume, save=save)
        else:
            _fit_augmented(trainers, probes, tr_aug, train, train_idx, n_used, pcfg, seed, workers, decode, size,
                           env, loader_device, log, resume, save)
            feats_va, y_va = _extract(probes, val, indices=None, **extract)
            if "avgpool" in heads:
                # The kNN bank must be unaugmented: one more eval-view pass over the train set (at
                # ImageNet's published protocol, ~1% of the AvgPool job's 100 epochs of forwards).
                feats_tr, y_tr = _extract(probes, train, indices=train_idx, **{**extract, "heads": ["avgpool"]})
        for t in trainers:
            results[t.name] = _top1(_correct(t.head, feats_va[t.name], y_va), n_val, env)
        log(f"[{pcfg['name']}] top-1: " + ", ".join(f"{k} {results[k]:.2f}" for k in heads))
        if "avgpool" in heads:
            knn = _knn(feats_tr["avgpool"], y_tr, feats_va["avgpool"], y_va, n_used, n_val, env, device)
            log(f"[{pcfg['name']}] kNN top-1 (AvgPool, k={KS[0]}, T={TEMPERATURE}, bank {n_used}): {knn['top1']:.2f} "
                f"(k={KS[1]}: {knn['top1_k200']:.2f})")
        if p_i + 1 < len(pc["passes"]):
            ckpt.save(p_i + 1, results, torch.get_rng_state(), None, 0, None, t0, knn)
    summary = {
        "protocol": pc["protocol"], "top1": results, "dims": {k: dims[k] for k in results},
        "backbone": str(backbone_path), "pretrain_epochs": blob.get("epochs"), "pretrain_steps": blob.get("steps"),
        "pretrain_wall_s": blob.get("wall_s"), "pretrain_commit": blob.get("commit"),
        "pretrain_precision": blob.get("precision"), "init": cfg["pretrain"]["init"],
        "backbone_format": weights.format, "backbone_sha256": weights.sha256,
        "train_images": n_used, "val_images": n_val, "seed": seed, "knn": knn,
        "probe_wall_s": round(ckpt.wall_before + time.time() - t0, 1), "probe_commit": git_commit(), "config": cfg,
    }
    if env.main:
        write_json(out, summary)
        ckpt.path.unlink(missing_ok=True)
    return summary


def _knn(bank, bank_y, query, query_y, n_bank: int, n_query: int, env: Env, device) -> dict:
    """Weighted kNN top-1 of ``query`` (val) against ``bank`` (train), given this rank's shards of each.

    Every rank gathers all shards and computes the same numbers (no broadcast needed), on the
    compute device: ImageNet's 1.28M x 2048 float16 bank takes ~5 GB there, ~16 GB with the float32
    copy knn_predict normalises.
    """
    if device.type == "meta":  # no numbers to classify (the device test)
        top1 = {k: float("nan") for k in KS}
    else:
        gather = distributed.gather_rows
        bank, bank_y = gather(bank.flatten(1), n_bank, env, device), gather(bank_y, n_bank, env, device)
        query, query_y = gather(query.flatten(1), n_query, env, device), gather(query_y, n_query, env, device)
        top1 = knn_top1(bank.to(device), bank_y.to(device), query.to(device), query_y.to(device))
    return {"features": "avgpool", "k": KS[0], "top1": top1[KS[0]], f"top1_k{KS[1]}": top1[KS[1]],
            "temperature": TEMPERATURE, "bank": n_bank, "queries": n_query}


def _load_weights(cfg: dict, backbone_path):
    """The backbone to probe: our backbone.pth, or (``pretrain.init: checkpoint``) a published checkpoint
    in any format ``barlow.weights`` reads; both loaded safely (weights_only), both checked tensor by tensor."""
    from barlow.weights import Loaded, load_weights, sha256

    arch = cfg["model"]["arch"]
    if cfg["pretrain"]["init"] == "checkpoint":
        ck = cfg["pretrain"]["checkpoint"]
        return load_weights(backbone_path, arch, ck["format"], ck["trust_checkpoint"])
    blob = load_backbone(backbone_path, arch)
    info = {k: v for k, v in blob.items() if k not in ("state_dict", "config")}
    return Loaded(blob["state_dict"], "barlow", sha256(backbone_path), info)


def merge_passes(parts: list[str | Path], out: str | Path) -> dict:
    """One experiment's pass results (each a ``run_probes`` output) -> its probes.json (one table row)."""
    import json

    blobs = []
    for path in map(Path, parts):
        try:
            blobs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: unreadable probe pass result ({type(e).__name__}); rerun that probe pass") from None
    merged = dict(blobs[0])
    merged["config"] = json.loads(json.dumps(blobs[0]["config"]))
    merged["config"]["probe"]["passes"] = [p for b in blobs for p in b["config"]["probe"]["passes"]]
    merged["top1"] = {k: v for b in blobs for k, v in b["top1"].items()}
    merged["knn"] = next((b["knn"] for b in reversed(blobs) if b.get("knn")), None)  # the AvgPool pass's, as top1
    merged["dims"] = {k: v for b in blobs for k, v in b["dims"].items()}
    merged["probe_wall_s"] = round(sum(b.get("probe_wall_s") or 0 for b in blobs), 1)
    merged["passes"] = {p["name"]: str(path) for b, path in zip(blobs, parts) for p in b["config"]["probe"]["passes"]}
    for key in ("backbone", "backbone_sha256", "pretrain_commit", "train_images", "val_images"):
        values = {json.dumps(b.get(key)) for b in blobs}
        if len(values) > 1:
            raise BadInput(f"{out}: its passes disagree on {key} ({', '.join(sorted(values))}); rerun the probes")
    write_json(out, merged)
    return merged


def _quiet(*args, **kwargs) -> None:
    """The log of ranks > 0: rank 0 speaks for all."""


def _aug_seed(seed: int, rank: int, epoch: int, index: int) -> int:
    """Seed of one batch's augmentation generator (rank 0: the formula of single-process runs)."""
    return seed * 1_000_003 + epoch * 100_003 + index + rank * (1 << 48)


def _fit_augmented(trainers, probes, aug, train, train_idx, n, pcfg, seed, workers, decode, size, env,
                   loader_device, log, resume, save) -> None:
    """Train heads with the backbone running on every (augmented) batch.

    Epoch e visits the permutation FFCV's RANDOM order gives one process (numpy, seed + e); its
    batches are consecutive slices, and with several processes rank r decodes positions r, r +
    world, ... of each slice (FFCV's distributed sampler over the explicit order). Each global
    batch's augmentation is drawn from (seed, epoch, batch) for all its samples and every rank
    applies that of the positions it holds, so a sample gets the same view on any number of
    processes. A resumed epoch starts its loader at the first unfinished batch instead of decoding
    and skipping the others.
    """
    from barlow.augment import layout_positions

    bs = pcfg["batch_size"]
    device = torch.device(env.device)
    base = np.asarray(train_idx) if train_idx else np.arange(n, dtype="uint64")
    spe = n // bs
    epochs = max(t.epochs for t in trainers)
    step = resume["step"] if resume is not None else 0
    while step < epochs * spe:
        epoch, skip = divmod(step, spe)
        active = [t for t in trainers if t.active(epoch)]
        for t in active:
            t.set_epoch(epoch)
            t.head.train()
        order = np.random.default_rng(seed + epoch).permutation(base)[skip * bs:]
        loader = make_loader(train, bs // env.world, train=False, drop_last=True, workers=workers, seed=seed,
                             decode=decode, size=size, indices=order, device=loader_device,
                             distributed=env.world > 1)
        it = iter(loader)
        try:
            for i, batch in enumerate(it, start=skip):
                if i >= spe:
                    break  # with several processes FFCV pads the order: never read past the global batches
                (x,), y = split_batch(batch, 1)
                g = torch.Generator().manual_seed(_aug_seed(seed, 0, epoch, i))  # rank 0's seed on every rank
                at = layout_positions(env.rank, env.world, x.shape[0])
                views = aug(x.to(device, non_blocking=True), g, positions=at, total=bs)
                pooled = probes.pooled(views, [t.name for t in active])
                for t in active:
                    _sgd_step(t, pooled[t.name], y)
                step += 1
                save(step, spe)
        finally:
            it.close()
        log(f"[{pcfg['name']}] epoch {epoch + 1}/{epochs} done")


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
def _extract(probes, path, heads, aug, pcfg, workers, seed, indices, loader_device="cpu", decode="simple",
             size=224, env: Env | None = None):
    """This rank's pooled features (host memory, float16) and labels of ``path`` in file order.

    The backbone computes on its own device, whatever device the loader delivers to. With several
    processes rank r gets positions r, r + world, ... (FFCV's distributed sampler); the sampler's
    padding (repeats of the first images, to even out the shards) is dropped.
    """
    env = env or Env()
    device = _device_of(probes)
    # Variable-size images: resize to eval_resize, center crop `size` (published: 256 -> 224).
    ratio = size / pcfg.get("eval_resize", round(size * 256 / 224))
    loader = make_loader(path, max(1, pcfg["batch_size"] // env.world), train=False, workers=workers, seed=seed,
                         decode=decode, size=size, indices=indices, device=loader_device, drop_last=False,
                         center_ratio=ratio, distributed=env.world > 1)
    n = len(indices) if indices is not None else beton_length(path)
    total = len(range(env.rank, n, env.world))  # this rank's real images; the padding comes after them
    # Written into preallocated tensors: a list of per-batch chunks plus their torch.cat would
    # hold every feature twice at the end (measured: ~675 MiB more peak at 20k Fashion-MNIST images).
    feats: dict[str, torch.Tensor] = {}
    ys = torch.empty(total, dtype=torch.long)
    peak = torch.zeros((), device=device)
    at = 0
    it = iter(loader)
    try:
        for batch in it:
            (x,), y = split_batch(batch, 1)
            k_real = min(len(y), total - at)
            if k_real <= 0:
                break
            for k, v in probes.pooled(aug(x.to(device, non_blocking=True)), heads).items():
                if k not in feats:
                    feats[k] = torch.empty((total, *v.shape[1:]), dtype=torch.float16)
                v = v[:k_real]
                if v.is_meta:
                    continue  # meta tensors hold no data (the device test): nothing to copy
                peak = torch.maximum(peak, v.abs().amax())
                feats[k][at:at + k_real].copy_(v, non_blocking=False)
            ys[at:at + k_real] = y[:k_real].long().cpu()
            at += k_real
    finally:
        it.close()
    if at != total:
        raise RuntimeError(f"{path}: the loader gave {at} images to rank {env.rank}, expected {total}")
    if not peak.is_meta and float(peak) > FP16_MAX:
        raise FloatingPointError(f"{path}: a pooled feature reaches {float(peak):.3g}, beyond float16 "
                                 f"({FP16_MAX:g}), in which cached features are kept; use cached: false")
    return feats, ys


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _sgd_step(t: HeadTrainer, x: torch.Tensor, y: torch.Tensor, scale: float | None = None) -> None:
    """One optimizer step of head ``t`` on a batch that may live on any device (moved here).

    ``scale`` None: mean cross-entropy; else ``scale`` x the summed loss (the cached protocol with
    several processes, whose ranks hold unequal parts of a global batch).
    """
    device = _device_of(t.head)
    x = x.to(device, non_blocking=True).float()
    y = y.to(device, non_blocking=True).long()
    logits = t.model(x) if t.model is not None else t.head(x)
    if scale is None:
        loss = nn.functional.cross_entropy(logits, y)
    else:
        loss = nn.functional.cross_entropy(logits, y, reduction="sum") * scale
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    t.opt.step()


def _fit_cached(trainers, feats, y, batch_size, seed, log, env: Env | None = None, n: int | None = None,
                resume: dict | None = None, save=None):
    """Train heads on cached frozen features.

    The features never change, so each head's BatchNorm gets the statistics of the whole train
    set once (the value its running averages would converge to) and stays in eval mode; a step
    is then one gather and one small matmul per head, instead of re-normalising every batch.

    ``feats``/``y`` hold this rank's images (global positions rank, rank + world, ...; all of them
    with one process) of the ``n`` train images. Every epoch draws one global permutation; each
    global batch is a slice of it, of which every rank trains on the images it holds.
    """
    env = env or Env()
    n = len(y) if n is None else n
    t0 = time.time()
    for t in trainers:
        if isinstance(t.head.norm, nn.BatchNorm2d):
            device = _device_of(t.head)
            x = feats[t.name]
            stats = torch.zeros(2 * x.shape[1] + 1, dtype=torch.float64, device=device)
            for i in range(0, len(x), 1024):  # 4096 rows: float64 chunk + square of Feature1 = 0.6 GB
                chunk = x[i:i + 1024].to(device, non_blocking=True).double()
                stats[:x.shape[1]] += chunk.sum((0, 2, 3))
                stats[x.shape[1]:-1] += chunk.pow(2).sum((0, 2, 3))
            stats[-1] += len(x) * x.shape[2] * x.shape[3]
            if env.world > 1:
                dist.all_reduce(stats)
            c, count = x.shape[1], stats[-1]
            mean = stats[:c] / count
            t.head.norm.running_mean.copy_(mean.float())
            t.head.norm.running_var.copy_((stats[c:2 * c] / count - mean**2).clamp_min(0).float())
        t.head.eval()
    g = torch.Generator().manual_seed(seed)
    spe = n // batch_size
    epochs = max(t.epochs for t in trainers)
    step = 0
    if resume is not None:
        step = resume["step"]
        g.set_state(resume["generator"])  # its state at the start of the epoch `step` falls in
    scale = env.world / batch_size if env.world > 1 else None
    while step < epochs * spe:
        epoch, skip = divmod(step, spe)
        active = [t for t in trainers if t.active(epoch)]
        for t in active:
            t.set_epoch(epoch)
        gen_at_epoch_start = g.get_state()
        perm = torch.randperm(n, generator=g)
        for b in range(skip, spe):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            if env.world > 1:
                idx = idx[idx % env.world == env.rank] // env.world  # the images this rank holds
            yb = y[idx]
            for t in active:
                _sgd_step(t, feats[t.name][idx], yb, scale)
            step += 1
            if save is not None:
                save(step, spe, g.get_state() if b + 1 == spe else gen_at_epoch_start)
        if (epoch + 1) % max(1, epochs // 5) == 0 or epoch + 1 == epochs:
            log(f"cached probes: epoch {epoch + 1}/{epochs} ({time.time() - t0:.0f} s)")


@torch.no_grad()
def _correct(head: Head, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """How many of (x, y) the head classifies right, as a tensor on the head's device (no sync)."""
    head.eval()
    device = _device_of(head)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(y), batch):
        logits = head(x[i:i + batch].to(device, non_blocking=True).float())
        correct += (logits.argmax(1) == y[i:i + batch].to(device, non_blocking=True)).sum()
    return correct


def _top1(correct: torch.Tensor, total: int, env: Env | None = None) -> float:
    """Top-1 in percent from this rank's correct count (summed over ranks).

    The one place a result becomes a number: on the ``meta`` device (the device test) there is no
    number to read, so top-1 is NaN.
    """
    if env is not None and env.world > 1:
        correct = correct.clone()
        dist.all_reduce(correct)
    if correct.is_meta:
        return float("nan")
    return round(100.0 * int(correct) / total, 2)


class _Checkpointer:
    """Rank 0 writes the probes' resume checkpoint; every rank reads and checks it."""

    def __init__(self, path: Path, cfg: dict, backbone_path, env: Env, every: int, sha: str | None = None):
        self.path, self.cfg, self.env, self.every = path, cfg, env, max(1, int(every))
        self.backbone_path = Path(backbone_path)
        self.wall_before = 0.0
        self._sha = sha  # the backbone file's sha256 (hashed on first use when not given)

    def backbone_sha(self) -> str:
        if self._sha is None:
            from barlow.weights import sha256

            self._sha = sha256(self.backbone_path)
        return self._sha

    def save(self, pass_index: int, results: dict, rng: torch.Tensor, trainers, step: int, generator, t0: float,
             knn: dict | None = None):
        if not self.env.main:
            return
        blob = {"config": _resume_view(self.cfg), "backbone_sha256": self.backbone_sha(), "pass": pass_index,
                "results": dict(results), "rng": rng, "step": step, "generator": generator,
                "wall_s": self.wall_before + time.time() - t0, "knn": knn}
        if trainers:
            blob["heads"] = {t.name: _to_cpu(t.head.state_dict()) for t in trainers}
            blob["optimizers"] = {t.name: _to_cpu(t.opt.state_dict()) for t in trainers}
        save_torch(blob, self.path)

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            # weights_only: it holds only tensors and plain types (heads, optimizers, RNG states as tensors)
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types for damaged files
            raise BadInput(f"{self.path}: damaged probe checkpoint ({type(e).__name__}); delete it to restart the "
                           "probes from scratch") from None
        diff = _config_diff(state.get("config", {}), _resume_view(self.cfg))
        if diff:
            raise BadInput(f"{self.path}: made with another probe config ({diff}); delete it to restart the probes "
                           "with this config, or restore the old setting")
        if state.get("backbone_sha256") != self.backbone_sha():
            raise BadInput(f"{self.path}: made for other backbone weights than {self.backbone_path} (retrained "
                           "since?); delete it to restart the probes")
        return state


def _to_cpu(obj):
    """Tensors in a (nested) state dict copied to the CPU; meta tensors (no data) saved as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach() if obj.is_meta else obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _resume_view(cfg: dict) -> dict:
    """What a probe checkpoint must agree on (barlow.identity: the experiment less its runtime knobs)."""
    return learning_config(cfg)


def _config_diff(old, new) -> str:
    """Both sides with today's defaults: a checkpoint written before a default was filled in still resumes."""
    return first_difference(learning_config(with_defaults(old)), learning_config(with_defaults(new)))
