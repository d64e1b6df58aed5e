"""The training step's cluster behaviour: one gradient all-reduce per optimizer step under
accumulation (DDP no_sync), and a non-finite fp16 step skipped by the loss scaler instead of
ending the run."""
from __future__ import annotations

import os

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from barlow.loss import Objective
from barlow.train_step import train_step
from tests.conftest import free_port
from tests.ranks import run_ranks



def _count_allreduces(rank, world, port, micro, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)))
        calls = []

        def hook(state, bucket):
            calls.append(bucket.index())
            return default_hooks.allreduce_hook(None, bucket)

        net.register_comm_hook(None, hook)
        g = torch.Generator().manual_seed(rank)
        batches = [(torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)) for _ in range(micro)]
        train_step(net, batches, Objective("exact"), offset=rank * 4 * micro, total=world * 4 * micro,
                   scaler=torch.amp.GradScaler("cpu", enabled=False))
        out[rank] = len(calls)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_accumulation_all_reduces_gradients_once_per_step():
    with mp.Manager() as manager:
        out = manager.dict()
        run_ranks(_count_allreduces, 2, free_port(), 4, out)
        counts = dict(out)
    # one bucket (a tiny model), reduced once for the step: without no_sync it was once per micro-batch (4)
    assert counts == {0: 1, 1: 1}


@pytest.mark.slow
def test_a_non_finite_fp16_step_is_skipped_by_the_scaler(fmnist_tiny, tmp_path, monkeypatch):
    from barlow import pretrain as pt
    from barlow.config import resolve
    from barlow.distributed import Env

    real = pt.objective_from_config
    calls = {"n": 0}

    def poisoned(p):
        obj = real(p)

        def once_infinite(z1, z2, offset, total):
            calls["n"] += 1
            loss, scale = obj(z1, z2, offset, total)
            return (loss * float("inf"), scale) if calls["n"] == 2 else (loss, scale)
        return once_infinite

    monkeypatch.setattr(pt, "objective_from_config", poisoned)
    cfg = resolve("fmnist_r18", {"pretrain": {"epochs": 1, "max_steps": 4, "batch_size": 16, "workers": 1,
                                              "precision": "amp_fp16", "checkpoint_every_steps": 100,
                                              "monitor": {"enabled": False}}})  # fp16 autocast is slow on a CPU
    out = pt.pretrain(cfg, fmnist_tiny["train"], tmp_path / "backbone.pth", env=Env())
    assert out.is_file()
    m = pd.read_csv(tmp_path / "metrics.csv")
    assert list(m["step"]) == [1, 2, 3, 4]
    assert m["loss"].isin([float("inf")]).sum() == 1 and m["loss"].iloc[[0, 2, 3]].map(lambda v: v < 1e9).all()
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["scaler"]["scale"] < 65536.0  # the scaler lowered its scale (at least at the skipped step)


@pytest.mark.slow
def test_a_non_finite_fp32_step_still_stops_the_run(fmnist_tiny, tmp_path, monkeypatch):
    from barlow import pretrain as pt
    from barlow.config import resolve
    from barlow.distributed import Env

    real = pt.objective_from_config
    monkeypatch.setattr(pt, "objective_from_config",
                        lambda p: (lambda z1, z2, o, t: (real(p)(z1, z2, o, t)[0] * float("nan"), 1.0)))
    cfg = resolve("fmnist_r18", {"pretrain": {"epochs": 1, "max_steps": 2, "batch_size": 64, "workers": 1,
                                              "precision": "fp32"}})
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0"):
        pt.pretrain(cfg, fmnist_tiny["train"], tmp_path / "backbone.pth", env=Env())
