"""Layout-invariant views: pretraining's augmentation of a sample does not depend on how the global
batch is split over processes (world) and accumulation micro-batches.

Each optimizer step seeds one generator from (seed, epoch, step), draws the parameters of its whole
global batch, and every (rank, micro-batch) applies those of the positions FFCV gave it
(``barlow.augment.layout_positions``: FFCV's distributed sampler strides, rank r holds r, r + world, ...).
Checked on the functions the training loop calls and on the views the real loop makes (captured
where the loop calls the augmentation), in one process and in two gloo processes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from barlow import augment as A
from barlow import pretrain as pt
from barlow.config import resolve
from barlow.distributed import Env
from tests.conftest import free_port
from tests.ranks import run_ranks

SEED = 0


def _old_batch_seed(seed, rank, epoch, index):
    """The seed formula before layout-invariant views (one process: rank 0)."""
    h = seed
    for v in (rank, epoch, index):
        h = (h * 1_000_003 + v) % (2**61 - 1)
    return h


def _images(n, side=40, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the functions the loop calls


@pytest.mark.parametrize("world,accum", [(2, 1), (2, 2), (3, 1), (4, 2), (8, 1), (8, 4)])
def test_layout_positions_are_the_samples_ffcv_gives(world, accum):
    """Rank r's loader batch i under FFCV's distributed order (torch's DistributedSampler over the
    epoch's order, then consecutive batches of n) holds epoch positions step * total + layout_positions."""
    n, steps = 4, 3
    total = world * accum * n
    for rank in range(world):
        mine = list(DistributedSampler(range(steps * total), num_replicas=world, rank=rank, shuffle=False))
        for i in range(steps * accum):
            step, k = divmod(i, accum)
            want = [step * total + q for q in A.layout_positions(rank, world, n, micro=k)]
            assert mine[i * n:(i + 1) * n] == want, (rank, i)
    # together the ranks and micro-batches of a step cover its global batch exactly once
    got = sorted(q for r in range(world) for k in range(accum) for q in A.layout_positions(r, world, n, k))
    assert got == list(range(total))


def test_one_process_draws_what_it_drew_before():
    """One process without accumulation: the views of the former (seed, rank 0, epoch, batch) generator, bitwise."""
    v1, v2 = A.barlow_views(32)
    aug1, aug2 = A.BatchAugment(v1), A.BatchAugment(v2)
    x = _images(24)
    for epoch, step in ((0, 0), (3, 17)):
        g = torch.Generator().manual_seed(_old_batch_seed(SEED, 0, epoch, step))
        before = aug1(x, g), aug2(x, g)
        now = pt.step_views(aug1, aug2, x, x, seed=SEED, epoch=epoch, step=step, total=24)
        assert torch.equal(now[0], before[0]) and torch.equal(now[1], before[1])


@pytest.mark.parametrize("world,accum", [(1, 2), (1, 4), (2, 1), (2, 2), (4, 1), (8, 1), (8, 2)])
def test_every_layout_gives_every_sample_the_views_of_one_process(world, accum):
    """The published pair (crop, flip, jitter, gray, blur, solarize) at 32 px on a global batch of 64:
    the parts made by step_views for each (rank, micro-batch) are the one-process views, bitwise."""
    v1, v2 = A.barlow_views(32)
    aug1, aug2 = A.BatchAugment(v1), A.BatchAugment(v2)
    total = 64
    x = _images(total, seed=1)
    ref = pt.step_views(aug1, aug2, x, x, seed=SEED, epoch=2, step=5, total=total)
    n = total // (world * accum)
    got = [torch.empty_like(ref[0]), torch.empty_like(ref[1])]
    for rank in range(world):
        for k in range(accum):
            idx = torch.tensor(list(A.layout_positions(rank, world, n, micro=k)))
            parts = pt.step_views(aug1, aug2, x[idx], x[idx], seed=SEED, epoch=2, step=5, total=total,
                                  rank=rank, world=world, micro=k)
            for out, part in zip(got, parts):
                out[idx] = part
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert not torch.equal(ref[0], ref[1])  # the two views drew different parameters


def test_positions_are_checked():
    aug = A.BatchAugment(A.ViewAugment(size=8))
    x, g = _images(4, side=8), torch.Generator()
    for bad in (dict(positions=range(3), total=8), dict(positions=range(5, 9), total=8), dict(total=8)):
        with pytest.raises(ValueError):
            aug(x, g, **bad)


# --------------------------------------------------------------------------- the real training loop


BATCH = 32  # the step's global batch: 1 x 32, 1 x 2 x 16, 2 x 16, 2 x 2 x 8


def _config(accum: int) -> dict:
    """The default preset's views (crop 0.3-1, flip, jitter, solarize) for one step of a small model;
    plain SGD without warmup, so that the step moves the weights in proportion to the gradient."""
    return resolve("fmnist_r18", {"model": {"projector": [128, 128]}, "pretrain": {
        "epochs": 1, "max_steps": 1, "batch_size": BATCH, "accumulation": accum, "workers": 1, "precision": "fp32",
        "optimizer": "sgd", "lr": 0.1, "warmup_epochs": 0.0, "checkpoint_every_steps": 100,
        "monitor": {"enabled": False}}})


def _key(image: torch.Tensor) -> bytes:
    return image.cpu().contiguous().numpy().tobytes()


def _run_capturing_views(cfg, train, out, env=None) -> dict:
    """pretrain() for its one step: ``views`` {decoded image: (view1, view2, global position, micro-batch,
    the image)} of the step (keyed by the image's bytes, the same in every layout) and ``weights``, the
    backbone after it (rank 0)."""
    calls = []

    class Recording(A.BatchAugment):
        def forward(self, x, *args, **kwargs):
            y = super().forward(x, *args, **kwargs)
            calls.append((self.which, x.clone(), kwargs.get("positions"), y.clone()))
            return y

    def augmenters(c):
        augs = [Recording(v) for v in A.views_from_config(c)]
        for which, a in enumerate(augs):
            a.which = which
        return augs

    real = pt._augmenters
    pt._augmenters = augmenters
    try:
        pt.pretrain(cfg, train, out, env=env or Env())
    finally:
        pt._augmenters = real
    views: dict = {}
    firsts = [c for c in calls if c[0] == 0]
    seconds = [c for c in calls if c[0] == 1]
    assert len(firsts) == len(seconds) == cfg["pretrain"]["accumulation"]  # one step: A micro-batches
    env = env or Env()
    for micro, ((_, x, given, y1), (_, x_b, _, y2)) in enumerate(zip(firsts, seconds)):
        pos = list(A.layout_positions(env.rank, env.world, len(x), micro))  # where FFCV put them (checked below)
        assert given is None or list(given) == pos
        for j, q in enumerate(pos):
            views[_key(x[j])] = (y1[j], y2[j], q, micro, x_b[j])
    weights = torch.load(out, map_location="cpu", weights_only=False)["state_dict"] if env.main else None
    return {"views": views, "weights": weights}


def _assert_same_views(a: dict, b: dict) -> None:
    if a.keys() != b.keys():
        pytest.fail(f"{len(a.keys() - b.keys())} of the step's {len(a)} samples are not in the other step")
    for key in a:
        assert a[key][2] == b[key][2]  # at the same global position
        assert torch.equal(a[key][0], b[key][0]) and torch.equal(a[key][1], b[key][1]), f"position {a[key][2]}"


def _rank(rank, world, port, train, out_dir, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for accum in (1, 2):
            got = _run_capturing_views(_config(accum), train, f"{out_dir}/a{accum}/backbone.pth",
                                       Env(rank, world, rank, "cpu"))
            results[(rank, accum)] = got
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process(fmnist_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("views1")
    return {a: _run_capturing_views(_config(a), fmnist_tiny["train"], out / f"a{a}" / "backbone.pth") for a in (1, 2)}


@pytest.fixture(scope="module")
def two_processes(fmnist_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("views2")
    with mp.Manager() as manager:
        results = manager.dict()
        run_ranks(_rank, 2, free_port(), str(fmnist_tiny["train"]), str(out), results)
        results = dict(results)
    merged = {}
    for accum in (1, 2):
        views = {**results[(0, accum)]["views"], **results[(1, accum)]["views"]}
        assert len(views) == BATCH
        merged[accum] = {"views": views, "weights": results[(0, accum)]["weights"]}
    return merged


def _train_images(path) -> list[bytes]:
    """The train set's decoded images in file order, as the loop's loader decodes them."""
    from barlow.loader import make_loader, split_batch

    loader = make_loader(path, 128, train=False, workers=1, drop_last=False)
    keys = []
    it = iter(loader)
    try:
        for batch in it:
            (x,), _ = split_batch(batch, 1)
            keys += [_key(im) for im in x]
    finally:
        it.close()
    assert len(set(keys)) == len(keys)  # every image identifies its sample
    return keys


@pytest.mark.slow  # ~10 s: two one-step pretraining runs of ResNet-18 at 32 px
def test_accumulation_gives_every_sample_the_views_of_one_batch(one_process):
    """One process: 2 micro-batches of 16 draw the views that one batch of 32 draws, sample by sample."""
    _assert_same_views(one_process[2]["views"], one_process[1]["views"])


@pytest.mark.slow  # ~25 s: two spawned processes import torch and FFCV, then two one-step runs each
def test_two_processes_give_every_sample_the_views_of_one(two_processes, one_process, fmnist_tiny):
    """2 gloo processes (with and without accumulation): each rank's views in the real loop are, sample by
    sample, what one process makes of the same global batch, and the samples sit where layout_positions says."""
    _assert_same_views(two_processes[2]["views"], two_processes[1]["views"])  # 2 x 2 x 8 = 2 x 16

    # The step's global batch as one process's RANDOM order gives it (numpy's permutation of seed + epoch,
    # which barlow.loader deals out to the ranks), checked against the samples the ranks really held ...
    keys = _train_images(fmnist_tiny["train"])
    order = np.random.default_rng(SEED + 0).permutation(len(keys)).tolist()
    step = two_processes[1]["views"]
    for key, (_, _, q, _, _) in step.items():
        assert keys[order[q]] == key, f"position {q}"
    # ... then augmented as one process augments its first batch (test_one_process_draws_what_it_drew_before):
    # bitwise the views the two ranks made.
    x = torch.stack([step[keys[order[q]]][4] for q in range(BATCH)])
    aug1, aug2 = pt._augmenters(_config(1))
    g = torch.Generator().manual_seed(_old_batch_seed(SEED, 0, 0, 0))
    ref = aug1(x, g), aug2(x, g)
    for q in range(BATCH):
        v1, v2 = step[keys[order[q]]][:2]
        assert torch.equal(v1, ref[0][q]) and torch.equal(v2, ref[1][q]), f"position {q}"


@pytest.mark.slow
def test_two_processes_and_one_put_the_same_samples_in_a_step(two_processes, one_process):
    """FFCV 1.0.2's own distributed RANDOM order is torch.randperm(seed + epoch), one process's numpy's
    permutation: before barlow.loader dealt out the one-process order, 1 and 2 tasks trained other samples."""
    _assert_same_views(two_processes[1]["views"], one_process[1]["views"])


@pytest.fixture(scope="module")
def one_process_frozen_bn(fmnist_tiny, tmp_path_factory):
    """one_process with every BatchNorm normalising by its running statistics (eval mode) in training."""
    from torch.nn.modules.batchnorm import _BatchNorm

    out, train = tmp_path_factory.mktemp("views1_frozen_bn"), _BatchNorm.train
    _BatchNorm.train = lambda self, mode=True: train(self, False)
    try:
        return {a: _run_capturing_views(_config(a), fmnist_tiny["train"], out / f"a{a}" / "backbone.pth")
                for a in (1, 2)}
    finally:
        _BatchNorm.train = train


def _max_difference(a: dict, b: dict, buffers: bool = False) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a
               if a[k].is_floating_point() and ("running" in k) == buffers)


@pytest.mark.slow  # ~5 s: two more one-step runs
def test_weights_after_a_step_are_equal_where_batchnorm_allows(one_process, one_process_frozen_bn):
    """1 x 32 and 1 x 2 x 16 (gradient caching) give every sample the same views, and the same step
    where BatchNorm does not depend on the forward's batch: with its running statistics (eval mode) the
    weights agree to float rounding (measured 3.8e-7, steps up to 2.4). With batch statistics, as
    trained, they do not: the backbone's and the projector's BatchNorm normalise each forward by its own
    16 or 32 samples (per micro-batch, and on several CPU ranks per rank: SyncBatchNorm only runs on
    GPUs, so 1 and 2 gloo processes differ alike)."""
    _assert_same_views(one_process_frozen_bn[2]["views"], one_process_frozen_bn[1]["views"])
    a, b = one_process_frozen_bn[1]["weights"], one_process_frozen_bn[2]["weights"]
    assert _max_difference(a, b) < 1e-5
    a, b = one_process[1]["weights"], one_process[2]["weights"]
    assert _max_difference(a, b) > 1e-2 and _max_difference(a, b, buffers=True) > 1e-3
