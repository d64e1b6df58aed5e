"""One optimizer step's forward and backward (``train_step``), with gradient accumulation either as one
big batch (gradient caching) or as separate micro-batch losses: what barlow/pretrain.py's loop calls
between reading the views and stepping the optimizer."""
from __future__ import annotations

import contextlib

import torch

from barlow.loss import Objective


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
        with _sync_unless_last(net, k == len(micro_batches) - 1):
            with autocast:
                a, b = net(x1), net(x2)
            torch.autograd.backward([a, b], [z1.grad[at:at + n].to(a.dtype), z2.grad[at:at + n].to(b.dtype)])
        at += n
    return loss.detach()


def _separate_losses(net, micro_batches, objective, offset, total, scaler, autocast) -> torch.Tensor:
    n = len(micro_batches)
    losses = []
    for k, (x1, x2) in enumerate(micro_batches):
        with _sync_unless_last(net, k == n - 1):
            with autocast:
                z1, z2 = net(x1), net(x2)
            loss, grad_scale = objective(z1, z2, offset // n, total // n)
            scaler.scale(loss * grad_scale / n).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def _sync_unless_last(net: torch.nn.Module, last: bool):
    """DDP's ``no_sync`` before the last micro-batch (it all-reduces only then); nothing otherwise."""
    return contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
