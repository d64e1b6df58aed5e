"""A pretraining stage started again: its ranks agree on the output lock before any collective of
training, and a finished checkpoint becomes backbone.pth without a job.

Rank 0 alone takes the lock; the others used to go straight into DDP's first collective, where a
rank 0 waiting on a held lock left them until NCCL's timeout, and the job ended FAILED. Now rank 0
waits at most ``LOCK_WAIT_S`` and broadcasts its verdict: all ranks train, return or fail together.
"""
from __future__ import annotations

import fcntl
import os

import pytest

from tests.conftest import free_port
from tests.ranks import run_ranks

pytestmark = pytest.mark.slow


def _rank(rank, world, port, train, out):
    import torch.distributed as dist

    from barlow import config, pretrain
    from barlow.distributed import Env

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = config.resolve("fmnist_r18", {"pretrain": {"epochs": 1, "batch_size": 64, "workers": 1, "precision": "fp32",
                                                     "monitor": {"enabled": False}}}, where="test")
    try:
        pretrain.pretrain(cfg, train, out, env=Env(rank, world, pg_timeout_s=1.0))  # waits 0.9 s
        return rank, "returned"
    except Exception as e:  # noqa: BLE001 - the test reads which one
        return rank, f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()


def _run_two(train, out):
    return dict(run_ranks(_rank, 2, free_port(), str(train), str(out)))


@pytest.mark.timeout(180)
def test_a_held_lock_fails_every_rank_at_once(fmnist_tiny, tmp_path):
    out = tmp_path / "bt" / "backbone.pth"
    out.parent.mkdir(parents=True)
    with open(out.parent / ".train.lock", "a+") as held:  # another trainer (this process) holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        said = _run_two(fmnist_tiny["train"], out)
    assert said[0].startswith("LockTimeout:") and "still held" in said[0], said
    assert said[1].startswith("BadInput: rank 1: rank 0 could not take the lock"), said
    assert not (out.parent / "checkpoint.pt").exists()


@pytest.mark.timeout(180)
def test_a_finished_output_returns_on_every_rank(fmnist_tiny, tmp_path):
    out = tmp_path / "bt" / "backbone.pth"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"finished earlier")
    assert _run_two(fmnist_tiny["train"], out) == {0: "returned", 1: "returned"}
    assert out.read_bytes() == b"finished earlier"


def test_a_finished_checkpoint_becomes_the_backbone_without_a_job(fmnist_tiny, tmp_path):
    """Snakemake's --rerun-incomplete deletes a finished run's backbone.pth after a restart: the stage
    writes it again from checkpoint.pt, the very weights, instead of queueing a job to do so."""
    import torch

    from barlow import config, pretrain
    from barlow.pretrain_checkpoint import finish_from_checkpoint

    cfg = config.resolve("fmnist_r18", {"pretrain": {"epochs": 1, "max_steps": 2, "batch_size": 64, "workers": 1,
                                                     "precision": "fp32", "monitor": {"enabled": False}}}, where="test")
    out = tmp_path / "bt" / "backbone.pth"
    assert not finish_from_checkpoint(cfg, out)  # nothing trained yet
    pretrain.pretrain(cfg, fmnist_tiny["train"], out)
    first = torch.load(out, weights_only=False)
    assert not finish_from_checkpoint(cfg, out)  # the backbone is there: nothing to do
    out.unlink()
    other = config.deep_merge(cfg, {"pretrain": {"lr": cfg["pretrain"]["lr"] * 2}})
    assert not finish_from_checkpoint(other, out) and not out.exists()  # another experiment's checkpoint
    assert finish_from_checkpoint(cfg, out)
    again = torch.load(out, weights_only=False)
    assert again["steps"] == first["steps"] == 2 and again["precision"] == first["precision"] == "fp32"
    assert first["state_dict"].keys() == again["state_dict"].keys()
    assert all(torch.equal(first["state_dict"][k], again["state_dict"][k]) for k in first["state_dict"])
