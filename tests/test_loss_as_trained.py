"""The as-trained loss against the head that produced the published numbers, on real gloo ranks.

Oracle: MMSelfSup v0.11.0 ``mmselfsup/models/heads/latent_pred_head.py`` (LatentCrossCorrelationHead),
written out in tests/upstream/mmselfsup_v0.py from that file: each rank standardises its own batch with a plain
``nn.BatchNorm1d(affine=False)``, divides ``bn(z1)ᵀ bn(z2)`` by ``batch × world_size`` and sums it
over ranks with the plain (autograd-invisible) ``torch.distributed.all_reduce``; DDP averages the
gradients. Our emulation (``barlow.loss.as_trained_loss`` through ``barlow.train_step.train_step``)
must give the same parameter gradients in one process, with accumulation, and when its groups
span ranks; the exact variant must equal the full-batch single-process gradient.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from barlow.loss import Objective, as_trained_loss, barlow_twins_loss
from barlow.train_step import train_step
from tests import upstream as up
from tests.conftest import free_port
from tests.ranks import run_ranks

LAMBD = 0.0051
N_RANK, DIM_IN, DIM = 8, 12, 10


def _mmselfsup_head(z1, z2, world):
    """The upstream LatentCrossCorrelationHead (tests/upstream/mmselfsup_v0.py), on this rank."""
    head = up.latent_cross_correlation_head()(z1.shape[1]).to(z1.dtype).train()
    assert head.world_size == world
    return head(z1, z2)["loss"]


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM_IN, 16), nn.ReLU(), nn.Linear(16, DIM)).double()


def _data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM_IN, generator=g, dtype=torch.float64), torch.randn(n, DIM_IN, generator=g, dtype=torch.float64)


def _grads(net):
    return [p.grad.detach().clone() for p in net.parameters()]



def _worker(rank, world, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x1, x2 = _data(N_RANK * world)
        mine = slice(rank * N_RANK, (rank + 1) * N_RANK)
        net = nn.parallel.DistributedDataParallel(_net())
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        if mode == "mmselfsup":
            loss = _mmselfsup_head(net(x1[mine]), net(x2[mine]), world)
            loss.backward()
        else:
            obj = Objective(mode, LAMBD, group=N_RANK * world if mode == "as_trained" else None)
            loss = train_step(net, [(x1[mine], x2[mine])], obj, offset=rank * N_RANK, total=N_RANK * world,
                              scaler=scaler)
        out[rank] = (float(loss.detach()), _grads(net.module))
    finally:
        dist.destroy_process_group()


def _spawn(mode, world=2):
    with mp.Manager() as manager:
        out = manager.dict()
        run_ranks(_worker, world, free_port(), mode, out, world=world)
        return dict(out)


def _close(a, b):
    """Relative error <= 1e-6 per parameter; the last Linear's bias, whose true gradient is 0 (the
    loss standardises it away), is held to an absolute 1e-12 instead."""
    for g, h in zip(a, b):
        assert (g - h).norm() <= 1e-6 * h.norm() + 1e-12, f"relative error {(g - h).norm() / h.norm():.2e}"
    flat_a, flat_b = torch.cat([g.flatten() for g in a]), torch.cat([h.flatten() for h in b])
    assert (flat_a - flat_b).norm() <= 1e-6 * flat_b.norm()


@pytest.fixture(scope="module")
def mmselfsup_two_ranks():
    return _spawn("mmselfsup")


@pytest.mark.slow
def test_emulation_in_one_process_equals_the_mmselfsup_head_on_two_ranks(mmselfsup_two_ranks):
    x1, x2 = _data(2 * N_RANK)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    obj = Objective("as_trained", LAMBD, group=N_RANK)
    one = _net()
    loss = train_step(one, [(x1, x2)], obj, offset=0, total=2 * N_RANK, scaler=scaler)
    two = _net()  # one process, 2 accumulation micro-batches: each holds one recipe GPU's samples
    loss_acc = train_step(two, [(x1[:N_RANK], x2[:N_RANK]), (x1[N_RANK:], x2[N_RANK:])], obj, offset=0,
                          total=2 * N_RANK, scaler=scaler)
    for rank in (0, 1):
        ref_loss, ref_grads = mmselfsup_two_ranks[rank]
        assert abs(float(loss) - ref_loss) <= 1e-10 * ref_loss
        assert abs(float(loss_acc) - ref_loss) <= 1e-10 * ref_loss
        _close(_grads(one), ref_grads)
        _close(_grads(two), ref_grads)
    # what the exact loss would have done: a different function (global BN) and about 2x the gradient
    exact = _net()
    barlow_twins_loss(exact(x1), exact(x2), LAMBD).backward()
    ratio = torch.cat([g.flatten() for g in _grads(exact)]).norm() / torch.cat([g.flatten() for g in ref_grads]).norm()
    assert ratio > 1.5, ratio


@pytest.mark.slow
def test_as_trained_groups_spanning_ranks_equal_the_recipe_on_one_gpu():
    """Recipe: 1 GPU x 16 (one group of 16, grad scale 1); ours: 2 ranks x 8 with loss_group 16."""
    x1, x2 = _data(2 * N_RANK)
    ref = _net()
    ref_loss = _mmselfsup_head(ref(x1), ref(x2), world=1)
    ref_loss.backward()
    for rank, (loss, grads) in _spawn("as_trained").items():
        assert abs(loss - float(ref_loss.detach())) <= 1e-10 * float(ref_loss.detach())
        _close(grads, _grads(ref))


@pytest.mark.slow
def test_exact_variant_on_two_ranks_equals_the_full_batch_gradient():
    x1, x2 = _data(2 * N_RANK)
    full = _net()
    full_loss = barlow_twins_loss(full(x1), full(x2), LAMBD)
    full_loss.backward()
    for rank, (loss, grads) in _spawn("exact").items():
        assert abs(loss - float(full_loss.detach())) <= 1e-10 * float(full_loss.detach())
        _close(grads, _grads(full))


def test_exact_with_accumulation_equals_one_big_batch():
    """Gradient caching: 3 micro-batches give the full-batch gradient (the old per-micro-batch
    loss average did not)."""
    x1, x2 = _data(24)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    big, acc = _net(), _net()
    obj = Objective("exact", LAMBD)
    train_step(big, [(x1, x2)], obj, offset=0, total=24, scaler=scaler)
    train_step(acc, [(x1[i:i + 8], x2[i:i + 8]) for i in (0, 8, 16)], obj, offset=0, total=24, scaler=scaler)
    _close(_grads(acc), _grads(big))


def test_accumulation_updates_norm_statistics_once_per_micro_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(DIM_IN, DIM), nn.BatchNorm1d(DIM)).double()
    ref = nn.Sequential(nn.Linear(DIM_IN, DIM), nn.BatchNorm1d(DIM)).double()
    ref.load_state_dict(net.state_dict())
    x1, x2 = _data(16)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(net, [(x1[:8], x2[:8]), (x1[8:], x2[8:])], Objective("exact", LAMBD), offset=0, total=16, scaler=scaler)
    with torch.no_grad():
        for x in (x1[:8], x2[:8], x1[8:], x2[8:]):  # the graph pass's forwards, in order
            ref(x)
    assert torch.equal(net[1].running_mean, ref[1].running_mean)
    assert int(net[1].num_batches_tracked) == 4


def test_group_of_the_whole_batch_is_the_exact_loss_value():
    z1, z2 = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 6, dtype=torch.float64)
    loss, scale = as_trained_loss(z1, z2, LAMBD, group=32, offset=0, total=32)
    assert scale == 1.0 and torch.allclose(loss, barlow_twins_loss(z1, z2, LAMBD), rtol=1e-12)
    with pytest.raises(ValueError, match="not a multiple"):
        as_trained_loss(z1, z2, LAMBD, group=10, offset=0, total=32)


def test_micro_batch_accumulation_equals_separate_upstream_losses_averaged():
    """OpenMixup's accumulation (update_interval): each micro-batch's own head loss / A, gradients
    summed. Oracle: the upstream head (one recipe GPU) on each micro-batch."""
    x1, x2 = _data(3 * N_RANK)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ref = _net()
    total = sum(_mmselfsup_head(ref(x1[i:i + N_RANK]), ref(x2[i:i + N_RANK]), world=1) for i in (0, 8, 16)) / 3
    total.backward()
    ours = _net()
    loss = train_step(ours, [(x1[i:i + N_RANK], x2[i:i + N_RANK]) for i in (0, 8, 16)],
                      Objective("as_trained", LAMBD, group=N_RANK), offset=0, total=3 * N_RANK, scaler=scaler,
                      per_micro_batch=True)
    assert abs(float(loss) - float(total.detach())) <= 1e-10 * float(total.detach())
    _close(_grads(ours), _grads(ref))
    whole = _net()  # the step-wide loss is a different function (one cross-correlation over all 24)
    train_step(whole, [(x1[i:i + N_RANK], x2[i:i + N_RANK]) for i in (0, 8, 16)], Objective("as_trained", LAMBD,
               group=N_RANK), offset=0, total=3 * N_RANK, scaler=scaler)
    diff = torch.cat([(a - b).flatten() for a, b in zip(_grads(whole), _grads(ref))]).norm()
    assert diff > 1e-3 * torch.cat([g.flatten() for g in _grads(ref)]).norm()
