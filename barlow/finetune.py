"""The semi-supervised fine-tune stage: the backbone and a linear head trained end to end on a labelled
subset of the train split (``barlow.finetune_subset``), top-1 and top-5 on val.

The recipe is facebookresearch/barlowtwins ``evaluate.py --weights finetune`` (commit 8e8d284): a
torchvision ResNet whose ``fc`` starts as N(0, 0.01) weights and zero bias, SGD with momentum 0.9 and
one weight decay over two parameter groups (classifier ``lr_classifier``, backbone ``lr_backbone``),
``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch, cross-entropy, the whole network in train
mode (BatchNorm statistics update), RandomResizedCrop(224) + flip for training and resize 256 + center
crop 224 for val, both normalised; val top-1/top-5 after every epoch.

What differs, and why:

* The table reports the FINAL epoch's top-1/top-5. evaluate.py prints ``best_acc``: the maxima over the
  epochs of top-1 and of top-5, each on its own (model selection on val); that figure is kept as
  ``best_on_val`` and labelled so, never as the result.
* Images come from the project's loaders (barlow.loader) and batch augmentation (barlow.augment), as for the
  probes: ImageNet-shaped data crops in FFCV's RandomResizedCrop decoder (0.08-1) and evaluates through its
  center-crop decoder at ratio 224/256; fixed-size data (Fashion-MNIST, CIFAR) is decoded whole and cropped
  here. Normalisation is pretraining's (ImageNet's mean/std for the ImageNet presets, as evaluate.py).
* The last incomplete batch of an epoch is dropped (evaluate.py keeps it): an epoch is then a whole number
  of global batches on any number of processes, which the resume relies on (11 of 12,811 images at 1 %).
* Several processes (``env.world > 1``) split each global batch as the probes do (barlow.fit); BatchNorm is
  per process, as in evaluate.py (DistributedDataParallel without SyncBatchNorm), so a run depends on the
  number of processes; before each evaluation every rank takes rank 0's running statistics (what evaluate.py,
  evaluating on rank 0 alone, uses), and evaluation is sharded.

Resuming: rank 0 writes ``<output stem>.checkpoint.pt`` beside the output every
``finetune.checkpoint_every_steps`` optimizer steps and after each epoch's evaluation; a rerun resumes
from it to the very result of an unbroken run (on the CPU: tests/test_finetune.py), refuses a checkpoint of
another learning config, other backbone weights or another subset, and deletes it once the output is written.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from barlow import distributed, layout
from barlow.atomic import save_torch, write_json
from barlow.augment import BatchAugment, layout_positions, views_from_config
from barlow.config import complete, with_defaults
from barlow.distributed import Env
from barlow.errors import BadInput
from barlow.features import eval_view, train_view
from barlow.finetune_subset import choose, file_sha256, subset_path
from barlow.fit import aug_seed, top1
from barlow.identity import RUNTIME, finetune_config, first_difference
from barlow.loader import beton_length, close_iterator, make_loader, split_batch
from barlow.model import backbone as make_backbone, level_channels
from barlow.probe import _load_weights, _num_classes
from barlow.probe_resume import _to_cpu
from barlow.provenance import git_commit


class Classifier(nn.Module):
    """The backbone and a linear head: torchvision's ResNet with its ``fc`` back."""

    def __init__(self, net: nn.Module, classes: int):
        super().__init__()
        self.backbone = net
        self.fc = nn.Linear(level_channels(net)[-1], classes)
        self.fc.weight.data.normal_(mean=0.0, std=0.01)  # evaluate.py's init of the new fc
        self.fc.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


@dataclasses.dataclass
class _Run:
    cfg: dict
    env: Env
    log: object
    train: Path
    val: Path
    indices: np.ndarray
    n_val: int
    classes: int
    decode: str
    loader_device: str
    train_aug: BatchAugment
    eval_aug: BatchAugment

    @property
    def ft(self) -> dict:
        return self.cfg["finetune"]

    @property
    def device(self) -> torch.device:
        return torch.device(self.env.device)


def with_finetune(cfg: dict) -> dict:
    """``cfg`` completed, its finetune section (defaults: the official recipe) filled in where absent."""
    return complete({**cfg, "finetune": cfg.get("finetune") or {}})


def run_finetune(cfg: dict, backbone_path: str | Path, train: str | Path, val: str | Path, out: str | Path,
                 percent: float, env: Env | None = None, log=print, identity: dict | None = None) -> dict:
    """Fine-tune on ``percent`` % of the train labels and write val top-1/top-5 (final epoch) to ``out``.

    ``env`` as for the probes (default: one process on the CPU). The subset is written beside ``out``
    (``finetune_subset.subset_path``) and recorded in it; ``identity`` (what the workflow says the result
    is) is written into ``out`` as given; its ``dataset`` names the subset's dataset (none without it).
    """
    t0 = time.time()
    env = env or Env()
    log = log if env.main else _quiet
    cfg, out = with_finetune(cfg), Path(out)
    ft = cfg["finetune"]
    if ft["batch_size"] % env.world:
        raise BadInput(f"finetune.batch_size {ft['batch_size']}: not divisible by the {env.world} processes "
                       f"(nodes x devices); choose a multiple of {env.world}")
    if env.device.startswith("cuda"):
        distributed.fp32_math(cfg["pretrain"]["tf32"])
    dataset = (identity or {}).get("dataset")  # (None when run by hand: never read out of the path)
    subset = choose(ft["subset"], percent, ft["seed"], train, dataset)
    if len(subset["indices"]) < ft["batch_size"]:
        raise BadInput(f"finetune percent {percent:g}: {len(subset['indices'])} train images, fewer than one batch "
                       f"of finetune.batch_size {ft['batch_size']}; choose a smaller batch or a larger fraction")
    sub_file = subset_path(out)
    if env.main:
        write_json(sub_file, subset)
    weights = _load_weights(cfg, backbone_path)
    run = _prepare(cfg, train, val, np.asarray(subset["indices"]), env, log)
    torch.manual_seed(ft["seed"])  # the head's init
    net = make_backbone(cfg["model"]["arch"])
    net.load_state_dict(weights.state_dict)
    model = Classifier(net, run.classes).to(run.device)
    opt, sched = _optimizer(model, ft)
    ckpt = Checkpointer(checkpoint_path(out), finetune_config(cfg, percent), weights.sha256,
                        _indices_sha(subset["indices"]), env, ft["checkpoint_every_steps"])
    state = ckpt.load(model, opt, sched)
    if state is not None:
        log(f"resuming the fine-tune from {ckpt.path}: step {state['step']}")
    history = _train(run, model, opt, sched, ckpt, state, t0)
    summary = _summary(cfg, percent, backbone_path, weights, subset, sub_file, history, run, ckpt, t0)
    if identity:
        summary["identity"] = dict(identity)
    if env.main:
        write_json(out, summary)
        ckpt.path.unlink(missing_ok=True)
    return summary


def _prepare(cfg: dict, train, val, indices: np.ndarray, env: Env, log) -> _Run:
    """Data, views and decoders, as the probes pick them (barlow.probe)."""
    size = cfg["data"]["image_size"]
    v1 = views_from_config(cfg)[0]  # normalised as pretraining did
    decode = "simple" if cfg["pretrain"]["decode"] == "simple" else "rrc"
    # rrc: FFCV's decoder already did RandomResizedCrop(size); simple: crop (0.08-1) here, then flip
    tr = BatchAugment(train_view(size, {"crop": decode == "simple"}, v1.mean, v1.std))
    ev = BatchAugment(eval_view(size, {}, v1.mean, v1.std))
    device = torch.device(env.device)
    loader_device = env.device if device.type == "cuda" else "cpu"
    return _Run(cfg, env, log, Path(train), Path(val), indices, beton_length(val), _num_classes(train, val), decode,
                loader_device, tr.to(device), ev.to(device))


def _optimizer(model: Classifier, ft: dict):
    """evaluate.py's: SGD(lr 0, momentum, weight_decay) over [classifier, backbone] groups, cosine by epoch."""
    groups = [dict(params=list(model.fc.parameters()), lr=ft["lr_classifier"]),
              dict(params=list(model.backbone.parameters()), lr=ft["lr_backbone"])]
    opt = torch.optim.SGD(groups, 0, momentum=ft["momentum"], weight_decay=ft["weight_decay"])
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, ft["epochs"])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on a batch (the labels moved to the images' device here)."""
    loss = nn.functional.cross_entropy(model(x), y.to(x.device, non_blocking=True).long())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _train(run: _Run, model: Classifier, opt, sched, ckpt: "Checkpointer", state: dict | None, t0: float) -> list:
    """Every epoch's steps and its val evaluation; returns the per-epoch results.

    Epoch e visits the subset in numpy's permutation of seed + e, in consecutive global batches (rank r
    decoding positions r, r + world, ... of each); batch i's augmentation is drawn from (seed, e, i) for the
    whole global batch: a resumed epoch starts its loader at its first unfinished batch and replays the rest.
    """
    env, ft = run.env, run.ft
    bs, seed = ft["batch_size"], ft["seed"]
    spe = len(run.indices) // bs
    ddp = distributed.wrap(model, env)
    step = state["step"] if state is not None else 0
    history = list(state["history"]) if state is not None else []
    while step < ft["epochs"] * spe:
        epoch, skip = divmod(step, spe)
        model.train()  # evaluate.py fine-tunes with BatchNorm in train mode
        order = np.random.default_rng(seed + epoch).permutation(run.indices)[skip * bs:]
        loader = make_loader(run.train, bs // env.world, train=False, drop_last=True, workers=ft["workers"],
                             seed=seed, decode=run.decode, size=run.cfg["data"]["image_size"], indices=order,
                             device=run.loader_device, distributed=env.world > 1)
        it, loss = iter(loader), None
        try:
            for i, batch in enumerate(it, start=skip):
                if i >= spe:
                    break  # with several processes FFCV pads the order: never read past the global batches
                (x,), y = split_batch(batch, 1)
                g = torch.Generator().manual_seed(aug_seed(seed, 0, epoch, i))
                at = layout_positions(env.rank, env.world, x.shape[0])
                views = run.train_aug(x.to(run.device, non_blocking=True), g, positions=at, total=bs)
                loss = train_step(ddp, opt, views, y)
                step += 1
                if step % spe and step % ckpt.every == 0:  # (the epoch's end is saved after its evaluation)
                    ckpt.save(model, opt, sched, step, history, t0)
        finally:
            close_iterator(it)
        result = {"epoch": epoch + 1, **evaluate(model, run), "lr_classifier": opt.param_groups[0]["lr"],
                  "lr_backbone": opt.param_groups[1]["lr"]}
        history.append(result)
        last = float(loss) if loss is not None else float("nan")
        run.log(f"fine-tune epoch {epoch + 1}/{ft['epochs']}: loss {last:.4f}, val top-1 {result['top1']:.2f} "
                f"top-5 {result['top5']:.2f}")
        sched.step()
        ckpt.save(model, opt, sched, step, history, t0)
    return history


@torch.no_grad()
def evaluate(model: Classifier, run: _Run) -> dict:
    """Val top-1 and top-5 (percent of all val images) of ``model`` in eval mode, sharded over the ranks."""
    env, size = run.env, run.cfg["data"]["image_size"]
    model.eval()
    if env.world > 1:
        import torch.distributed as dist

        for b in model.buffers():  # rank 0's BatchNorm statistics on every rank (evaluate.py's rank-0 eval)
            dist.broadcast(b, 0)
    eval_decode = "simple" if run.decode == "simple" else "center"
    loader = make_loader(run.val, max(1, run.ft["batch_size"] // env.world), train=False, workers=run.ft["workers"],
                         seed=run.ft["seed"], decode=eval_decode, size=size, device=run.loader_device,
                         drop_last=False, center_ratio=size / round(size * 256 / 224), distributed=env.world > 1)
    total = len(range(env.rank, run.n_val, env.world))  # this rank's real images; FFCV's padding after them
    hits = torch.zeros(2, dtype=torch.long, device=run.device)
    at = 0
    it = iter(loader)
    try:
        for batch in it:
            (x,), y = split_batch(batch, 1)
            k = min(len(y), total - at)
            if k <= 0:
                break
            logits = model(run.eval_aug(x[:k].to(run.device, non_blocking=True)))
            top = logits.topk(min(5, logits.shape[1]), 1).indices  # evaluate.py's accuracy(): topk, largest first
            right = top == y[:k].to(run.device, non_blocking=True).long()[:, None]
            hits += torch.stack([right[:, 0].sum(), right.any(1).sum()])
            at += k
    finally:
        close_iterator(it)
    return {"top1": top1(hits[0], run.n_val, env), "top5": top1(hits[1], run.n_val, env)}


def _summary(cfg, percent, backbone_path, weights, subset, sub_file, history, run: _Run, ckpt, t0) -> dict:
    blob, final = weights.info, history[-1]
    best = {"top1": max(h["top1"] for h in history), "top5": max(h["top5"] for h in history),
            "epoch_top1": max(history, key=lambda h: h["top1"])["epoch"],
            "note": "maxima over the epochs of val top-1 and of val top-5, each on its own: what evaluate.py "
                    "reports (best_acc), selected on val; the result is the final epoch's"}
    return {
        "protocol": "finetune", "percent": percent, "fraction": percent / 100, "method": subset["method"],
        "top1": final["top1"], "top5": final["top5"], "epochs": cfg["finetune"]["epochs"],
        "epoch_reported": final["epoch"], "reported": "final epoch", "per_epoch": history, "best_on_val": best,
        "subset_file": str(sub_file), "subset_sha256": file_sha256(sub_file) if run.env.main else None,
        "train_images": len(run.indices), "val_images": run.n_val, "classes": run.classes,
        "backbone": str(backbone_path), "backbone_format": weights.format, "backbone_sha256": weights.sha256,
        "pretrain_epochs": blob.get("epochs"), "pretrain_steps": blob.get("steps"), "init": cfg["pretrain"]["init"],
        "seed": cfg["finetune"]["seed"], "finetune_wall_s": round(ckpt.wall_before + time.time() - t0, 1),
        "finetune_commit": git_commit(), "config": cfg,
    }


def checkpoint_path(out: str | Path) -> Path:
    return Path(layout.finetune_checkpoint(str(out)))


def _indices_sha(indices) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()


class Checkpointer:
    """Rank 0 writes the fine-tune's resume checkpoint; every rank reads and checks it."""

    def __init__(self, path: Path, learning: dict, backbone_sha: str, subset_sha: str, env: Env, every: int):
        self.path, self.learning, self.env, self.every = path, learning, env, max(1, int(every))
        self.backbone_sha, self.subset_sha = backbone_sha, subset_sha
        self.wall_before = 0.0

    def save(self, model, opt, sched, step: int, history: list, t0: float) -> None:
        if not self.env.main:
            return
        save_torch({"config": self.learning, "backbone_sha256": self.backbone_sha, "subset_sha256": self.subset_sha,
                    "step": step, "history": list(history), "model": _to_cpu(model.state_dict()),
                    "optimizer": _to_cpu(opt.state_dict()), "scheduler": sched.state_dict(),
                    "wall_s": self.wall_before + time.time() - t0}, self.path)

    def load(self, model, opt, sched) -> dict | None:
        """The checkpoint's state loaded into model, optimizer and schedule; None when there is none."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)  # tensors and plain types only
        except Exception as e:  # noqa: BLE001 - torch raises several types for damaged files
            raise BadInput(f"{self.path}: damaged fine-tune checkpoint ({type(e).__name__}); delete it to restart "
                           "the fine-tune") from None
        diff = first_difference(_filled(state.get("config", {})), _filled(self.learning))
        if diff:
            raise BadInput(f"{self.path}: made with another fine-tune config ({diff}); delete it to restart the "
                           "fine-tune with this config, or restore the old setting")
        for key, mine, what in (("backbone_sha256", self.backbone_sha, "other backbone weights"),
                                ("subset_sha256", self.subset_sha, "another train subset (reconverted since?)")):
            if state.get(key) != mine:
                raise BadInput(f"{self.path}: made for {what}; delete it to restart the fine-tune")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        self.wall_before = state.get("wall_s", 0.0)
        return state


def _filled(learning: dict) -> dict:
    """A stored learning config with today's defaults (less the runtime knobs they bring): one written before
    a default was added still resumes."""
    cfg = with_defaults(learning)
    cfg["finetune"] = {k: v for k, v in cfg.get("finetune", {}).items() if k not in RUNTIME["finetune"]}
    return cfg


def _quiet(*args, **kwargs) -> None:
    """The log of ranks > 0: rank 0 speaks for all."""
