"""Barlow Twins pretraining: FFCV two-view loader -> batched augmentation -> ResNet + projector ->
loss -> LARS, with warmup + cosine schedule, per-step metrics CSV and resumable checkpoints.

Resuming is exact on the CPU with ``decode: simple``: the data order is one process's seeded order
for the epoch (dealt out to the ranks: barlow.loader), and each step's augmentation is drawn for its
global batch from (seed, epoch, step), each rank and micro-batch applying its positions' share
(``step_views``), so a run resumed at step k sees the very batches and views an unbroken run sees,
on any number of tasks (tests/test_pretrain.py checks the final weights bitwise; README,
"Determinism", says what ``decode: rrc`` cannot make identical). A checkpoint is written every
``checkpoint_every_steps`` optimizer steps and at each epoch end; rank 0 holds a lock on the
output directory (``barlow.pretrain_claim.claim``) so that a second launcher (e.g. a rerun after
Snakemake died) waits instead of training twice.

This module is the training loop and its setup; the job's other parts: ``barlow.train_step`` (one
step's forward and backward, with accumulation), ``barlow.pretrain_log`` (metrics.csv, progress,
the finiteness check), ``barlow.pretrain_checkpoint`` (checkpoint save/resume, backbone.pth,
``finish_from_checkpoint``) and ``barlow.pretrain_claim`` (the output folder's lock and verdict).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from barlow import distributed
from barlow import monitor as monitoring
from barlow.atomic import write_json
from barlow.augment import layout_positions, views_from_config
from barlow.config import complete
from barlow.errors import BadInput
from barlow.loader import beton_length, close_iterator, make_loader, split_batch
from barlow.loss import Objective
from barlow.model import BarlowTwins
from barlow.optim import group_lrs, make_optimizer, set_group_lrs
from barlow.pretrain_checkpoint import resume, save_backbone, save_checkpoint
from barlow.pretrain_claim import DONE, claim
from barlow.pretrain_log import Log, write_metrics
from barlow.provenance import git_commit
from barlow.train_step import train_step


def resolve_precision(precision: str, device: torch.device, cpu_fp16: str = "fp16") -> str:
    """``auto``: bf16 autocast where the hardware computes bf16 natively, else fp32 (CPU) or fp16.
    ``amp_fp16`` on a CPU with ``cpu_fp16: auto`` (smoke mode): what ``auto`` gives.

    On a CPU, bf16 only pays with native instructions (avx512_bf16 / AMX: the default pipeline's
    pretraining took 473 s in fp32, 323-379 s in bf16, benchmarks/README.md); without them oneDNN emulates it with
    conversions (not measured here, so fp32 stays the safe choice). torch's own check (mkldnn bf16
    "supported") is true for any AVX-512 CPU, so the CPU flags are read instead.
    """
    if precision == "amp_fp16" and device.type != "cuda" and cpu_fp16 == "auto":
        return resolve_precision("auto", device)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return "amp_bf16" if native_bf16(cpuinfo) else "fp32"


def native_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's flags name bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo.split()))


def batch_seed(seed: int, epoch: int, step: int) -> int:
    """Seed of the augmentation of optimizer step ``step`` (within ``epoch``): every rank and
    micro-batch seeds alike, draws the parameters of the step's whole global batch and applies those
    of the positions it holds (``barlow.augment.layout_positions``). The value is the former
    (seed, rank 0, epoch, batch index) hash, so one process without accumulation draws as before."""
    h = seed
    for v in (0, epoch, step):
        h = (h * 1_000_003 + v) % (2**61 - 1)
    return h


def step_views(aug1, aug2, x1: torch.Tensor, x2: torch.Tensor, *, seed: int, epoch: int, step: int, total: int,
               rank: int = 0, world: int = 1, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of micro-batch ``micro`` of rank ``rank`` (of ``world``) in optimizer step ``step``
    of ``epoch``, whose global batch has ``total`` samples: what the training loop feeds the model.
    Both views draw the whole global batch's parameters from one generator seeded by
    ``batch_seed`` and apply those of the positions FFCV gave this micro-batch."""
    g = torch.Generator().manual_seed(batch_seed(seed, epoch, step))
    at = layout_positions(rank, world, x1.shape[0], micro=micro)
    return aug1(x1, g, positions=at, total=total), aug2(x2, g, positions=at, total=total)


def pretrain(cfg: dict, train: str | Path, out: str | Path, env: distributed.Env | None = None,
             identity: dict | None = None) -> Path:
    """Train and write the backbone to ``out`` (its weights folder's backbone.pth, barlow.layout).

    The resume checkpoint and metrics live beside it: checkpoint.pt, metrics.csv. ``identity`` (dataset,
    weights key, the runs that read it: what the workflow says these weights are) is stored in ``out`` and,
    from the start, in identity.json beside it.
    """
    out = Path(out)
    out_dir = out.parent
    env = env or distributed.setup()
    cfg = complete(cfg)
    p, m = cfg["pretrain"], cfg["model"]
    if p["init"] == "checkpoint":
        raise BadInput("pretrain.init checkpoint: nothing to pretrain; probe the file directly "
                       "(`python -m barlow probe --backbone <checkpoint> ...`, or let Snakemake schedule it)")
    if identity and env.main:  # the folder says whose it is while it trains (metrics.csv has no room for it)
        write_json(out_dir / "identity.json", identity)
    torch.manual_seed(p["seed"])
    model = BarlowTwins(m["arch"], m["projector"], m["zero_init_residual"], m["projector_bias"], m["projector_init"])
    t_start = time.time()
    if p["init"] == "random" or p["epochs"] == 0:
        if env.main:
            _monitor_untrained(cfg, Path(train), model, env, out_dir / "metrics.csv")
            save_backbone(out, model, cfg, {"epochs": 0, "steps": 0, "wall_s": 0.0, "commit": git_commit(),
                                            "identity": identity})
        return out

    with claim(out, env) as verdict:
        if verdict == DONE:
            if env.main:
                print(f"{out} already exists: training finished earlier; nothing to do", flush=True)
            return out
        return _train(cfg, Path(train), out, env, model, t_start, identity)


def objective_from_config(p: dict) -> Objective:
    return Objective(p["loss"], p["lambd"], p["loss_group"])


def _check_batching(p: dict, env, train: Path) -> tuple[int, list | None, int]:
    """Per-device batch, the train indices (``limit_train``) and the images used; one line per misfit."""
    accum = p["accumulation"]
    per_device, rem = divmod(p["batch_size"], env.world * accum)
    if rem or per_device < 1:
        raise BadInput(f"pretrain.batch_size {p['batch_size']}: not divisible by nodes x devices x accumulation "
                       f"= {env.world} x {accum}; choose a multiple of {env.world * accum}")
    group = p["loss_group"] if p["loss"] == "as_trained" else None
    loss_batch = p["batch_size"] // accum if p["accumulation_loss"] == "micro_batch" else p["batch_size"]
    if group and loss_batch % group:
        raise BadInput(f"pretrain.loss_group {group}: the loss's global batch {loss_batch} is not a multiple "
                       "of it; the as-trained loss standardises the batch in groups of this size")
    n = beton_length(train)
    limit = p["limit_train"]
    indices = list(range(min(n, limit))) if limit else None
    n_used = len(indices) if indices else n
    if n_used < p["batch_size"]:
        raise BadInput(f"{train}: {n_used} images, fewer than one batch of {p['batch_size']}; lower pretrain.batch_size")
    return per_device, indices, n_used


@dataclasses.dataclass
class _Run:
    """What the training loop needs besides the model: built once by ``_setup``."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: object
    precision: str
    ratios: list
    loader: object
    steps_per_epoch: int
    total: int
    warmup: int
    device: torch.device
    memory_format: object
    monitor: monitoring.Monitor | None


def _setup(cfg, train: Path, env, model, per_device: int, indices) -> tuple[torch.nn.Module, _Run]:
    p, m = cfg["pretrain"], cfg["model"]
    accum = p["accumulation"]
    device = torch.device(env.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        distributed.fp32_math(p["tf32"])
    if gpu and m["sync_bn"] and env.world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if p["channels_last"] else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    opt = make_optimizer(model, p["optimizer"], p["lr"], p["weight_decay"], p["momentum"], p["eta"],
                         p["bias_lr_ratio"], p["lars"])
    precision = resolve_precision(p["precision"], device, p["cpu_fp16"])
    if env.main and precision != p["precision"]:
        why = (" (smoke mode: fp16 autocast on a CPU is ~14x slower and not the CUDA fp16 path; the loss scaler "
               "has its own test)") if p["precision"] == "amp_fp16" else ""
        print(f"precision: {p['precision']} -> {precision} on this {device.type}{why}", flush=True)
    amp_dtype = {"amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp_fp16")  # (CPU too: torch supports it)
    net = distributed.wrap(model, env)
    loader = make_loader(train, per_device, views=2, train=True, workers=p["workers"], seed=p["seed"],
                         decode=p["decode"], size=cfg["data"]["image_size"], scale=views_from_config(cfg)[0].scale,
                         distributed=env.world > 1, indices=indices, device=env.device)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise BadInput(f"{train}: too few images for one optimizer step per epoch; lower pretrain.batch_size")
    total = max(1, math.ceil(p["epochs"] * steps_per_epoch))
    if p["max_steps"]:
        total = min(total, p["max_steps"])
    mon = None
    if p["monitor"]["enabled"]:  # on every rank: each extracts its shard of the monitor's images
        mon = monitoring.Monitor(cfg, train, model.backbone, device, amp_dtype, memory_format, env)
    return model, _Run(net, opt, scaler, amp_dtype, precision, [g["lr_ratio"] for g in opt.param_groups],
                       loader, steps_per_epoch, total, int(p["warmup_epochs"] * steps_per_epoch), device,
                       memory_format, mon)


def _train(cfg, train: Path, out: Path, env, model, t_start, identity: dict | None = None) -> Path:
    p = cfg["pretrain"]
    ckpt_path, metrics_path = out.parent / "checkpoint.pt", out.parent / "metrics.csv"
    per_device, indices, _ = _check_batching(p, env, train)
    objective = objective_from_config(p)
    model, r = _setup(cfg, train, env, model, per_device, indices)
    aug1, aug2 = (a.to(r.device) for a in (_augmenters(cfg)))

    state = resume(ckpt_path, cfg, model, r, env)
    step, rows, wall_before = (state["step"], state["metrics"], state.get("wall_s", 0.0)) if state else (0, [], 0.0)
    log = Log(metrics_path, rows, env, r.total, r.steps_per_epoch, r.scaler, ckpt_path, state)

    def elapsed() -> float:
        return wall_before + time.time() - t_start

    def save_ckpt(step: int) -> None:
        log.sync()  # (the finiteness check of every step up to here, before its weights are kept)
        if env.main:
            save_checkpoint(ckpt_path, cfg, model, r, step, rows, elapsed)
        log.restart_window()  # (the checkpoint's time is not throughput)

    loop = _Loop(aug1, aug2, objective, env.rank * per_device * p["accumulation"], log, save_ckpt, elapsed)
    r.net.train()
    saved = step
    while step < r.total:
        step, saved = _epoch(p, env, r, loop, step, saved)
    if saved != step:  # (a checkpoint of ResNet-50 + its projector is 1.4 GB: never write it twice)
        save_ckpt(step)
    log.close()
    if env.main:
        save_backbone(out, model, cfg, {"epochs": p["epochs"], "steps": step, "commit": git_commit(),
                                        "wall_s": round(elapsed(), 1), "precision": r.precision,
                                        "identity": identity})
        print(f"wrote {out} after {step} steps", flush=True)
    return out


@dataclasses.dataclass
class _Loop:
    """What ``_epoch`` needs besides the ``_Run``: built once per launch by ``_train``."""

    aug1: object
    aug2: object
    objective: Objective
    offset: int  # the global position of this rank's first sample in each step's batch
    log: Log
    save_ckpt: object  # save_ckpt(step): log.sync, then the checkpoint after optimizer step ``step``
    elapsed: object  # elapsed(): seconds of training so far, earlier launches' included


def _epoch(p: dict, env, r: _Run, loop: _Loop, step: int, saved: int) -> tuple[int, int]:
    """The loader's pass over epoch ``step // steps_per_epoch`` from optimizer step ``step`` on (up to the
    epoch's or the run's end): (the step reached, the last step checkpointed)."""
    accum = p["accumulation"]
    epoch = step // r.steps_per_epoch
    skip = step - epoch * r.steps_per_epoch  # optimizer steps of this epoch already done
    r.loader.next_epoch = epoch  # FFCV's order is a function of (seed, epoch)
    it = iter(r.loader)
    micro: list = []
    try:
        for i, batch in enumerate(it):
            k = i // accum
            if k >= r.steps_per_epoch or step >= r.total:
                break
            if k < skip:
                continue  # replays the order only; nothing is computed for these batches
            (x1, x2), labels = split_batch(batch, 2)
            # this micro-batch's slice of the step's global views: the same on any world x accum
            x1, x2 = step_views(loop.aug1, loop.aug2, x1.to(r.device, non_blocking=True),
                                x2.to(r.device, non_blocking=True), seed=p["seed"], epoch=epoch, step=k,
                                total=p["batch_size"], rank=env.rank, world=env.world, micro=i % accum)
            x1 = x1.contiguous(memory_format=r.memory_format)
            x2 = x2.contiguous(memory_format=r.memory_format)
            if not micro:
                first_labels = labels.clone()  # FFCV reuses its label buffer a few batches later
            micro.append((x1, x2))
            if len(micro) < accum:
                continue
            loss, lr = _optimizer_step(p, r, loop, micro, step, first_labels)
            micro = []
            step += 1
            loop.log.add(step, loss, lr, x1.shape[0] * env.world * accum, loop.elapsed())
            if r.monitor is not None and r.monitor.due(step, r.steps_per_epoch, r.total):
                loop.log.watch(r.monitor)
            if step % p["checkpoint_every_steps"] == 0 or step % r.steps_per_epoch == 0:
                loop.save_ckpt(step)
                saved = step
            elif loop.log.full():
                loop.log.sync()
    finally:
        close_iterator(it)  # a half-consumed FFCV iterator can abort the process at exit
    return step, saved


def _optimizer_step(p: dict, r: _Run, loop: _Loop, micro: list, step: int, first_labels) -> tuple:
    """Optimizer step ``step + 1``: forward and backward of its micro-batches, the online head's step on
    the first one's labels, then the optimizer's at the step's learning rates. Returns the loss (on the
    device) and the learning rate of each parameter group."""
    if r.monitor is not None:
        r.monitor.start_step()
    loss = train_step(r.net, micro, loop.objective, offset=loop.offset, total=p["batch_size"], scaler=r.scaler,
                      amp_dtype=r.amp_dtype, per_micro_batch=p["accumulation_loss"] == "micro_batch")
    if r.monitor is not None:
        r.monitor.end_step(first_labels)
    lr = group_lrs(p, step, r.total, r.warmup, r.ratios)
    set_group_lrs(r.opt, lr)
    r.scaler.step(r.opt)  # under fp16 a non-finite step is skipped here and the scale lowered
    r.scaler.update()
    r.opt.zero_grad(set_to_none=True)
    return loss, lr


def _monitor_untrained(cfg, train: Path, model, env, metrics_path: Path) -> None:
    """The random-init baseline's monitor values (one step-0 row): the line the curves must cross."""
    if not cfg["pretrain"]["monitor"]["enabled"]:
        return
    if not train.is_file():  # (an untrained backbone needs no data; only its baseline row does)
        print(f"monitor: {train} missing, so no baseline row for the untrained backbone", flush=True)
        return
    device = torch.device(env.device)
    model = model.to(device)
    mon = monitoring.Monitor(cfg, train, model.backbone, device)
    watched = mon.evaluate()
    mon.close()
    print("untrained backbone, monitor: " + ", ".join(f"{k} {v}" for k, v in watched.items()), flush=True)
    write_metrics(metrics_path, [[0, 0.0, "", "", "", 0.0, *(watched[c] for c in monitoring.COLUMNS)]])


def _augmenters(cfg):
    from barlow.augment import BatchAugment

    return [BatchAugment(v) for v in views_from_config(cfg)]
