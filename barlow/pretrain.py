"""Barlow Twins pretraining: FFCV two-view loader -> batched augmentation -> ResNet + projector ->
loss -> LARS, with warmup + cosine schedule, per-step metrics CSV and resumable checkpoints.

Resuming is exact on the CPU with ``decode: simple``: the data order is one process's seeded order
for the epoch (dealt out to the ranks: barlow.loader), and each step's augmentation is drawn for its
global batch from (seed, epoch, step), each rank and micro-batch applying its positions' share
(``step_views``), so a run resumed at step k sees the very batches and views an unbroken run sees,
on any number of tasks (tests/test_pretrain.py checks the final weights bitwise; README,
"Determinism", says what ``decode: rrc`` cannot make identical). A checkpoint is written every
``checkpoint_every_steps`` optimizer steps and at each epoch end; rank 0 holds a lock on the
output directory (``_claim``) so that a second launcher (e.g. a rerun after Snakemake died) waits
instead of training twice.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import time
from pathlib import Path

import torch

from barlow import checkpoint, distributed, tb
from barlow.provenance import git_commit
from barlow.atomic import clean_stale, save_torch, write_text
from barlow.augment import layout_positions, views_from_config
from barlow.config import complete, with_defaults
from barlow.errors import BadInput
from barlow.identity import first_difference, weights_config
from barlow.loader import beton_length, make_loader, split_batch
from barlow.lock import LockTimeout, exclusive
from barlow.loss import Objective
from barlow.model import BarlowTwins
from barlow import monitor as monitoring
from barlow.optim import group_lrs, make_optimizer, set_group_lrs

METRICS = ["step", "epoch", "loss", "lr", "samples_per_s", "elapsed_s", *monitoring.COLUMNS]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast where the hardware computes bf16 natively, else fp32 (CPU) or fp16.

    On a CPU, bf16 only pays with native instructions (avx512_bf16 / AMX: the default pipeline's
    pretraining took 473 s in fp32, 323-379 s in bf16, benchmarks/README.md); without them oneDNN emulates it with
    conversions (not measured here, so fp32 stays the safe choice). torch's own check (mkldnn bf16
    "supported") is true for any AVX-512 CPU, so the CPU flags are read instead.
    """
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


def save_backbone(path: Path, model: BarlowTwins, cfg: dict, info: dict) -> None:
    state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    save_torch({"arch": cfg["model"]["arch"], "state_dict": state, "config": cfg, **info}, path)


def pretrain(cfg: dict, train: str | Path, out: str | Path, env: distributed.Env | None = None) -> Path:
    """Train and write the backbone to ``out`` (e.g. results/fmnist/bt/backbone.pth).

    The resume checkpoint and metrics live beside it: checkpoint.pt, metrics.csv.
    """
    out = Path(out)
    out_dir = out.parent
    env = env or distributed.setup()
    cfg = complete(cfg)
    p, m = cfg["pretrain"], cfg["model"]
    if p["init"] == "checkpoint":
        raise BadInput("pretrain.init checkpoint: nothing to pretrain; probe the file directly "
                       "(`python -m barlow probe --backbone <checkpoint> ...`, or let Snakemake schedule it)")
    torch.manual_seed(p["seed"])
    model = BarlowTwins(m["arch"], m["projector"], m["zero_init_residual"], m["projector_bias"], m["projector_init"])
    t_start = time.time()
    if p["init"] == "random" or p["epochs"] == 0:
        if env.main:
            _monitor_untrained(cfg, Path(train), model, env, out_dir / "metrics.csv")
            save_backbone(out, model, cfg, {"epochs": 0, "steps": 0, "wall_s": 0.0, "commit": git_commit()})
        return out

    with _claim(out, env) as verdict:
        if verdict == DONE:
            if env.main:
                print(f"{out} already exists: training finished earlier; nothing to do", flush=True)
            return out
        return _train(cfg, Path(train), out, env, model, t_start)


def finish_from_checkpoint(cfg: dict, out: str | Path) -> bool:
    """Write ``out`` from a checkpoint.pt whose training had finished, here, without a job (True if so).

    After a Snakemake restart ``--rerun-incomplete`` deletes a finished run's backbone.pth (its job
    was still marked running), and a job that died while writing it leaves the same state: without
    this, a whole multi-GPU allocation would be queued just to save the weights again.
    """
    out = Path(out)
    cfg = complete(cfg)
    state = checkpoint.load(out.parent / "checkpoint.pt", cfg["model"]["arch"])
    if state is None or out.exists() or "total" not in state or state["step"] < state["total"]:
        return False
    if config_diff(state.get("config", {}), cfg):
        return False  # another experiment's: pretrain() refuses it with the difference named
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    save_torch({"arch": cfg["model"]["arch"], "state_dict": weights, "config": cfg, "epochs": cfg["pretrain"]["epochs"],
                "steps": state["step"], "commit": git_commit(), "wall_s": round(state.get("wall_s", 0.0), 1),
                "precision": state.get("precision")}, out)
    print(f"wrote {out} from the finished {out.parent / 'checkpoint.pt'} (step {state['step']}/{state['total']}); "
          "no job needed", flush=True)
    return True


TRAIN, DONE, FAILED = 0, 1, 2
# Rank 0's longest wait for the output lock, as a share of the process group's timeout, which the other
# ranks spend waiting for the verdict: at the default 45 min, 40.5 min, beyond the fallback lock's stale
# takeover (lock.STALE_S, 30 min) after a holder was killed on another node.
LOCK_WAIT_SHARE = 0.9


@contextlib.contextmanager
def _claim(out: Path, env):
    """Rank 0 takes the output folder's lock (at most LOCK_WAIT_SHARE of the process group's timeout) and tells every rank the verdict:
    TRAIN, DONE (``out`` exists) or FAILED (the lock stayed held). So no rank enters DDP's first
    collective while rank 0 may still be waiting, and all leave together (before: the others timed
    out in NCCL's 10 min while rank 0 waited up to 30 min on a stale lock, and the job ended FAILED)."""
    if not env.main:
        verdict = _share(None, env)
        if verdict == FAILED:
            raise BadInput(f"rank {env.rank}: rank 0 could not take the lock of {out.parent} (rank 0's log says why)")
        yield verdict
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive(out.parent, max_wait_s=LOCK_WAIT_SHARE * env.pg_timeout_s))
        except LockTimeout:
            _share(FAILED, env)
            raise
        verdict = _share(DONE if out.exists() else TRAIN, env)
        if verdict == TRAIN:
            clean_stale(out.parent)  # a killed predecessor's half-written checkpoint; we hold the lock
        yield verdict


def _share(verdict: int | None, env) -> int:
    """Rank 0's ``verdict`` on every rank (a broadcast; gloo takes a CPU tensor, nccl a CUDA one)."""
    if env.world == 1:
        return verdict
    import torch.distributed as dist

    where = env.device if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([-1 if verdict is None else verdict], device=where)
    dist.broadcast(t, 0)
    return int(t.item())


def _upcast(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return list(module.buffers())


def train_step(net: torch.nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], objective: Objective, *,
               offset: int, total: int, scaler: torch.amp.GradScaler, amp_dtype=None,
               per_micro_batch: bool = False) -> torch.Tensor:
    """Forward and backward one optimizer step's micro-batches; leaves (scaled) gradients in ``.grad``.

    ``micro_batches`` are this process's augmented view pairs, ``offset`` the global position of
    its first sample and ``total`` the step's global batch (see ``barlow.loss``). Returns the loss
    (detached). The optimizer step is the caller's.

    One micro-batch: the plain forward/backward. Several (``pretrain.accumulation``): the loss
    must see the whole step's cross-correlation (and, as_trained, groups that span micro-batches),
    so the embeddings are computed first without a graph, the loss's gradient with respect to them
    is taken, and each micro-batch is then recomputed with a graph and back-propagated from that
    gradient ("gradient caching", Gao et al. 2021): the same gradient as one big batch (for every
    layer but the backbone's BatchNorm statistics, which stay per micro-batch) for one extra
    forward. Norm-layer running statistics are restored after the graph-free pass so they are
    updated once, and DDP all-reduces only at the last micro-batch (``no_sync`` before it).

    ``per_micro_batch`` (``pretrain.accumulation_loss: micro_batch``) is the other accumulation
    (OpenMixup's, mmcv's optimizer hooks): each micro-batch has its own loss over its own global
    micro-batch (positions ``offset / A``, ``total / A``), divided by the number A of micro-batches,
    and the gradients add up. Returns the mean of the micro-batch losses.
    """
    device_type = micro_batches[0][0].device.type
    autocast = torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None)
    if per_micro_batch and len(micro_batches) > 1:
        return _separate_losses(net, micro_batches, objective, offset, total, scaler, autocast)
    if len(micro_batches) == 1:
        x1, x2 = micro_batches[0]
        with autocast:
            z1, z2 = net(x1), net(x2)
        loss, grad_scale = objective(z1, z2, offset, total)  # half precision is upcast there
        scaler.scale(loss * grad_scale).backward()
        return loss.detach()
    saved = [b.clone() for b in _buffers(net)]
    with torch.no_grad(), autocast:
        zs = [(net(x1), net(x2)) for x1, x2 in micro_batches]
    for b, v in zip(_buffers(net), saved):
        b.copy_(v)
    z1 = _upcast(torch.cat([a for a, _ in zs])).requires_grad_(True)
    z2 = _upcast(torch.cat([b for _, b in zs])).requires_grad_(True)
    loss, grad_scale = objective(z1, z2, offset, total)
    scaler.scale(loss * grad_scale).backward()
    at = 0
    for k, (x1, x2) in enumerate(micro_batches):
        n = x1.shape[0]
        last = k == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast:
                a, b = net(x1), net(x2)
            torch.autograd.backward([a, b], [z1.grad[at:at + n].to(a.dtype), z2.grad[at:at + n].to(b.dtype)])
        at += n
    return loss.detach()


def _separate_losses(net, micro_batches, objective, offset, total, scaler, autocast) -> torch.Tensor:
    n = len(micro_batches)
    losses = []
    for k, (x1, x2) in enumerate(micro_batches):
        sync = contextlib.nullcontext() if k == n - 1 or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast:
                z1, z2 = net(x1), net(x2)
            loss, grad_scale = objective(z1, z2, offset // n, total // n)
            scaler.scale(loss * grad_scale / n).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def objective_from_config(p: dict) -> Objective:
    return Objective(p["loss"], p["lambd"], p["loss_group"])


# A non-finite loss under fp16 is the loss scaler's business (it skips the step and lowers the
# scale); this many in a row means the run itself diverged.
MAX_SKIPPED_STEPS = 20


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
    precision = resolve_precision(p["precision"], device)
    if env.main and precision != p["precision"]:
        print(f"precision: {p['precision']} -> {precision} on this {device.type}", flush=True)
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


def _train(cfg, train: Path, out: Path, env, model, t_start) -> Path:
    p, m = cfg["pretrain"], cfg["model"]
    out_dir = out.parent
    ckpt_path, metrics_path = out_dir / "checkpoint.pt", out_dir / "metrics.csv"
    accum = p["accumulation"]
    per_device, indices, _ = _check_batching(p, env, train)
    objective = objective_from_config(p)
    model, r = _setup(cfg, train, env, model, per_device, indices)
    opt, scaler, total, steps_per_epoch, mon = r.opt, r.scaler, r.total, r.steps_per_epoch, r.monitor
    aug1, aug2 = (a.to(r.device) for a in (_augmenters(cfg)))

    state = _resume(ckpt_path, cfg, model, r, env)
    step, rows, wall_before = (state["step"], state["metrics"], state.get("wall_s", 0.0)) if state else (0, [], 0.0)
    log = _Log(metrics_path, rows, env, total, steps_per_epoch, scaler, ckpt_path, state)

    def save_ckpt():
        log.sync()  # (the finiteness check of every step up to here, before its weights are kept)
        if env.main:
            checkpoint.save(ckpt_path, arch=m["arch"], model=model.state_dict(), optimizer=opt.state_dict(),
                            scaler=scaler.state_dict(), step=step, metrics=rows, config=cfg,
                            monitor=mon.state_dict() if mon is not None else None,
                            wall_s=wall_before + time.time() - t_start, total=total, precision=r.precision)
        log.restart_window()  # (the checkpoint's time is not throughput)

    every = p["checkpoint_every_steps"]
    seed = p["seed"]
    offset, step_batch = env.rank * per_device * accum, p["batch_size"]
    per_micro = p["accumulation_loss"] == "micro_batch"
    r.net.train()
    saved = step
    while step < total:
        epoch = step // steps_per_epoch
        skip = step - epoch * steps_per_epoch  # optimizer steps of this epoch already done
        r.loader.next_epoch = epoch  # FFCV's order is a function of (seed, epoch)
        it = iter(r.loader)
        micro: list = []
        try:
            for i, batch in enumerate(it):
                k = i // accum
                if k >= steps_per_epoch or step >= total:
                    break
                if k < skip:
                    continue  # replays the order only; nothing is computed for these batches
                (x1, x2), labels = split_batch(batch, 2)
                # this micro-batch's slice of the step's global views: the same on any world x accum
                x1, x2 = step_views(aug1, aug2, x1.to(r.device, non_blocking=True), x2.to(r.device, non_blocking=True),
                                    seed=seed, epoch=epoch, step=k, total=step_batch, rank=env.rank,
                                    world=env.world, micro=i % accum)
                x1 = x1.contiguous(memory_format=r.memory_format)
                x2 = x2.contiguous(memory_format=r.memory_format)
                if not micro:
                    first_labels = labels.clone()  # FFCV reuses its label buffer a few batches later
                micro.append((x1, x2))
                if len(micro) < accum:
                    continue
                if mon is not None:
                    mon.start_step()
                loss = train_step(r.net, micro, objective, offset=offset, total=step_batch, scaler=scaler,
                                  amp_dtype=r.amp_dtype, per_micro_batch=per_micro)
                if mon is not None:
                    mon.end_step(first_labels)
                micro = []
                lr = group_lrs(p, step, total, r.warmup, r.ratios)
                set_group_lrs(opt, lr)
                scaler.step(opt)  # under fp16 a non-finite step is skipped here and the scale lowered
                scaler.update()
                opt.zero_grad(set_to_none=True)
                step += 1
                log.add(step, loss, lr, x1.shape[0] * env.world * accum, wall_before + time.time() - t_start)
                if mon is not None and mon.due(step, steps_per_epoch, total):
                    log.watch(mon)
                if step % every == 0 or step % steps_per_epoch == 0:
                    save_ckpt()
                    saved = step
                elif log.full():
                    log.sync()
        finally:
            it.close()  # a half-consumed FFCV iterator can abort the process at exit
    if saved != step:  # (a checkpoint of ResNet-50 + its projector is 1.4 GB: never write it twice)
        save_ckpt()
    log.close()
    if env.main:
        save_backbone(out, model, cfg, {"epochs": p["epochs"], "steps": step, "commit": git_commit(),
                                        "wall_s": round(wall_before + time.time() - t_start, 1),
                                        "precision": r.precision})
        print(f"wrote {out} after {step} steps", flush=True)
    return out


def _resume(ckpt_path: Path, cfg, model, r: _Run, env) -> dict | None:
    """Load the last checkpoint of this experiment into model, optimizer, scaler, RNGs and monitor;
    None when there is none. Another experiment's checkpoint stops with one line naming the difference."""
    state = checkpoint.load(ckpt_path, cfg["model"]["arch"])
    if state is None:
        return None
    diff = config_diff(state.get("config", {}), cfg)
    if diff:
        raise BadInput(f"{ckpt_path}: was trained with another config ({diff}); training it further would mix "
                       "two experiments. Move the checkpoint away to retrain, or restore the old setting")
    model.load_state_dict(state["model"])
    r.opt.load_state_dict(state["optimizer"])
    r.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    if r.monitor is not None:
        r.monitor.load_state_dict(state.get("monitor"))
    if env.main:
        print(f"resuming from {ckpt_path} at step {state['step']}/{r.total} "
              f"(epoch {state['step'] // r.steps_per_epoch})", flush=True)
    return state


def _check_finite(loss: float, skipped: int, step: int, epoch: int, scaler, ckpt_path: Path) -> int:
    """Non-finite steps in a row so far; raises when it is the run, not the loss scale, that diverged."""
    finite = math.isfinite(loss)
    skipped = 0 if finite else skipped + 1
    if not finite and (not scaler.is_enabled() or skipped > MAX_SKIPPED_STEPS):
        raise FloatingPointError(
            f"loss is {loss} at step {step} (epoch {epoch})"
            + (f", the {skipped}th non-finite step in a row" if scaler.is_enabled() else "")
            + f"; the last good checkpoint ({ckpt_path}) is kept; lower pretrain.lr or check the data")
    return skipped


# Host syncs of the losses: each step's loss stays on the device until SYNC_EVERY steps or SYNC_S
# seconds have gone by (a GPU step had two syncs, isfinite and item, and a metrics.csv flush; a
# sync every second or two costs nothing, and metrics.csv stays as fresh for whoever watches it).
# Also synced before every checkpoint (a non-finite loss is caught before its weights are kept) and
# every monitor evaluation.
SYNC_EVERY, SYNC_S = 25, 2.0


class _Log:
    """metrics.csv, the progress lines and the finiteness check, fed one step at a time."""

    def __init__(self, path: Path, rows: list, env, total: int, steps_per_epoch: int, scaler, ckpt_path: Path, state):
        self.rows, self.env, self.total, self.per_epoch = rows, env, total, steps_per_epoch
        self.scaler, self.ckpt_path = scaler, ckpt_path
        self.first = state["step"] if state else 0
        self.pending: list = []  # [step, loss tensor, lr, images, elapsed_s, monitor values]
        self.skipped, self.t0 = 0, time.time()
        self.restart_window()
        self.file = self.writer = self.tb = None
        if env.main:
            _write_metrics(path, rows)
            self.file = open(path, "a", newline="")
            self.writer = csv.writer(self.file)
            self.tb = tb.writer(path.parent, self.first)

    def add(self, step: int, loss: torch.Tensor, lrs: list[float], images: int, elapsed_s: float) -> None:
        """Step ``step``'s loss (still on the device), its learning rate per parameter group, its images."""
        self.pending.append([step, loss.detach(), lrs, images, elapsed_s, {}])

    def full(self) -> bool:
        return len(self.pending) >= SYNC_EVERY or time.time() - self.t_window >= SYNC_S

    def watch(self, mon) -> None:
        """The monitor's evaluation after the last step: its values go into that step's row, its time
        (from the moment the device has caught up) is taken out of the throughput."""
        if self.pending and self.pending[-1][1].is_cuda:
            torch.cuda.synchronize()
        t = time.time()
        self.pending[-1][5] = mon.evaluate()
        self.excluded += time.time() - t
        self.sync()

    def restart_window(self) -> None:
        self.t_window, self.excluded = time.time(), 0.0

    def sync(self) -> None:
        """One host sync for the pending steps: check them, write their rows, print progress."""
        if not self.pending:
            return
        losses = torch.stack([x[1] for x in self.pending]).float().cpu().tolist()
        now = time.time()
        rate = sum(x[3] for x in self.pending) / max(now - self.t_window - self.excluded, 1e-9)  # the window's mean
        gpu_gb = torch.cuda.max_memory_allocated() / 2**30 if self.pending[-1][1].is_cuda else None
        for (step, _, lrs, _, elapsed, watched), loss in zip(self.pending, losses):
            lr = lrs[0]
            # (named by the steps done before it, as the checkpoint it falls back to counts them)
            self.skipped = _check_finite(loss, self.skipped, step - 1, (step - 1) // self.per_epoch, self.scaler,
                                         self.ckpt_path)
            self.rows.append([step, round(step / self.per_epoch, 4), loss, lr, round(rate, 1), round(elapsed, 2),
                              *(watched.get(c, "") for c in monitoring.COLUMNS)])
            if self.tb is not None:
                tb.write_step(self.tb, step, loss, lrs, rate, watched, gpu_gb)
            if self.writer is not None:
                self.writer.writerow(self.rows[-1])
                if watched:
                    print(f"step {step}/{self.total} monitor: kNN k=20 {watched['knn_k20']:.2f}, k=200 "
                          f"{watched['knn_k200']:.2f}, online linear {watched['linear_top1']:.2f} "
                          f"({watched['monitor_s']:.1f} s)", flush=True)
                self._progress(step, loss, lr, rate, now)
        self.pending = []
        if self.file is not None:
            self.file.flush()
        if self.tb is not None:
            self.tb.flush()
        self.restart_window()

    def _progress(self, step: int, loss: float, lr: float, rate: float, now: float) -> None:
        if step % max(1, min(50, self.total // 20)) == 0 or step == self.total:
            eta = (self.total - step) * (now - self.t0) / max(1, step - self.first)
            print(f"step {step}/{self.total} epoch {(step - 1) // self.per_epoch} loss {loss:.2f} lr {lr:.4g} "
                  f"{rate:.0f} img/s eta {eta / 60:.1f} min", flush=True)

    def close(self) -> None:
        self.sync()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


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
    _write_metrics(metrics_path, [[0, 0.0, "", "", "", 0.0, *(watched[c] for c in monitoring.COLUMNS)]])


def config_diff(old: dict, new: dict) -> str:
    """First difference between two experiments in what the weights depend on (barlow.identity); both
    with today's defaults, so a checkpoint written before a default was filled in still resumes."""
    return first_difference(weights_config(with_defaults(old)), weights_config(with_defaults(new)))


def _augmenters(cfg):
    from barlow.augment import BatchAugment

    return [BatchAugment(v) for v in views_from_config(cfg)]


def _write_metrics(path: Path, rows: list) -> None:
    # rows of a checkpoint written before the monitor's columns existed are padded with empty cells
    rows = [list(r) + [""] * (len(METRICS) - len(r)) for r in rows]
    text = ",".join(METRICS) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    write_text(path, text)
