"""Training the probe heads: on every (augmented) batch of the backbone, or on cached frozen features.

Every consumer (``sgd_step``, ``count_correct``, the BN statistics of ``fit_cached``) moves its batch to
the heads' device itself, so a loader may deliver batches on any device. tests/test_probe.py runs
the whole probe with compute on PyTorch's ``meta`` device and CPU batches: a missing move raises there.

Several processes (``env.world > 1``, one per device) split every global batch: the order of an
epoch is the global permutation FFCV's RANDOM order gives one process (numpy, seeded seed +
epoch), and rank r takes its positions r, r + world, ... (FFCV's distributed sampler over that
order), so each global batch is the union of the ranks' batches and a run's heads do not depend
on the number of processes (up to float rounding). Evaluation is sharded too and the correct
counts summed.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from barlow.distributed import Env
from barlow.heads import Head, HeadTrainer, device_of
from barlow.loader import close_iterator, make_loader, split_batch


def aug_seed(seed: int, rank: int, epoch: int, index: int) -> int:
    """Seed of one batch's augmentation generator (rank 0: the formula of single-process runs)."""
    return seed * 1_000_003 + epoch * 100_003 + index + rank * (1 << 48)


def fit_augmented(trainers, probes, aug, train, train_idx, n, pcfg, seed, workers, decode, size, env,
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
                g = torch.Generator().manual_seed(aug_seed(seed, 0, epoch, i))  # rank 0's seed on every rank
                at = layout_positions(env.rank, env.world, x.shape[0])
                views = aug(x.to(device, non_blocking=True), g, positions=at, total=bs)
                pooled = probes.pooled(views, [t.name for t in active])
                for t in active:
                    sgd_step(t, pooled[t.name], y)
                step += 1
                save(step, spe)
        finally:
            close_iterator(it)
        log(f"[{pcfg['name']}] epoch {epoch + 1}/{epochs} done")


def sgd_step(t: HeadTrainer, x: torch.Tensor, y: torch.Tensor, scale: float | None = None) -> None:
    """One optimizer step of head ``t`` on a batch that may live on any device (moved here).

    ``scale`` None: mean cross-entropy; else ``scale`` x the summed loss (the cached protocol with
    several processes, whose ranks hold unequal parts of a global batch).
    """
    device = device_of(t.head)
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


def fit_cached(trainers, feats, y, batch_size, seed, log, env: Env | None = None, n: int | None = None,
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
            device = device_of(t.head)
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
                sgd_step(t, feats[t.name][idx], yb, scale)
            step += 1
            if save is not None:
                save(step, spe, g.get_state() if b + 1 == spe else gen_at_epoch_start)
        if (epoch + 1) % max(1, epochs // 5) == 0 or epoch + 1 == epochs:
            log(f"cached probes: epoch {epoch + 1}/{epochs} ({time.time() - t0:.0f} s)")


@torch.no_grad()
def count_correct(head: Head, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """How many of (x, y) the head classifies right, as a tensor on the head's device (no sync)."""
    head.eval()
    device = device_of(head)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(y), batch):
        logits = head(x[i:i + batch].to(device, non_blocking=True).float())
        correct += (logits.argmax(1) == y[i:i + batch].to(device, non_blocking=True)).sum()
    return correct


def top1(correct: torch.Tensor, total: int, env: Env | None = None) -> float:
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
