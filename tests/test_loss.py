"""The loss against the official formula, single-process and under a real 2-process gloo group."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from barlow.loss import barlow_twins_loss
from tests.conftest import free_port
from tests.ranks import run_ranks


def reference_loss(z1, z2, lambd):
    """facebookresearch/barlowtwins main.py, BarlowTwins.forward, on one device."""
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False).to(z1.dtype).train()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    n = c.shape[0]
    off = c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()
    return on_diag + lambd * off.pow_(2).sum()


def test_matches_reference_value_and_gradients():
    torch.manual_seed(0)
    z1 = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    ours = barlow_twins_loss(z1, z2, 0.0051)
    g1, g2 = torch.autograd.grad(ours, (z1, z2))
    ref = reference_loss(z1, z2, 0.0051)
    r1, r2 = torch.autograd.grad(ref, (z1, z2))
    assert torch.allclose(ours, ref, rtol=1e-10)
    assert torch.allclose(g1, r1, rtol=1e-8, atol=1e-12) and torch.allclose(g2, r2, rtol=1e-8, atol=1e-12)


def test_perfectly_correlated_views_have_small_loss():
    z = torch.randn(512, 8, dtype=torch.float64)
    decorrelated = torch.linalg.qr(z)[0] * 512**0.5  # orthogonal columns: c = I
    assert barlow_twins_loss(decorrelated, decorrelated, 0.0051) < 1e-3
    assert barlow_twins_loss(z, torch.randn(512, 8, dtype=torch.float64), 0.0051) > 7



def _worker(rank, world, port, x1, x2, w, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = slice(rank * len(x1) // world, (rank + 1) * len(x1) // world)
        weight = w.clone().requires_grad_(True)  # a parameter replicated on every rank, as under DDP
        loss = barlow_twins_loss(x1[shard] @ weight, x2[shard] @ weight, 0.0051)
        reduced = []
        plain = dist.all_reduce
        dist.all_reduce = lambda t, *a, **k: (reduced.append(t.numel()), plain(t, *a, **k))[1]
        try:
            loss.backward()
        finally:
            dist.all_reduce = plain
        # backward all-reduces the per-dimension statistics' gradients (16 each), never c's (16 x 16):
        # every rank's dL/dc is the same, so summing it is a multiplication (issue 22: 256 MB a step)
        assert reduced and max(reduced) < 16 * 16, reduced
        dist.all_reduce(weight.grad)  # what DDP does to parameter gradients: average over ranks
        weight.grad /= world
        out[rank] = (loss.detach(), weight.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_full_batch():
    torch.manual_seed(1)
    x1, x2 = torch.randn(48, 16, dtype=torch.float64), torch.randn(48, 16, dtype=torch.float64)
    w = torch.randn(16, 16, dtype=torch.float64)
    full_w = w.clone().requires_grad_(True)
    full = barlow_twins_loss(x1 @ full_w, x2 @ full_w, 0.0051)
    full.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        run_ranks(_worker, 2, free_port(), x1, x2, w, out)
        results = dict(out)
    for rank in (0, 1):
        loss, grad = results[rank]
        assert torch.allclose(loss, full.detach(), rtol=1e-10)
        # Without the autograd-aware all_reduce this comes out halved (scaled by 1/world_size).
        assert torch.allclose(grad, full_w.grad, rtol=1e-8, atol=1e-12)
