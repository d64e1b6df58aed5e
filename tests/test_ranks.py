"""tests/ranks.py, the pool that serves the two-rank tests: results by rank, a rank's error or death as the call's
error, a rank blocked after the other's error killed within the grace, and the same processes for the next call."""
from __future__ import annotations

import os
import time

import pytest

from tests import ranks
from tests.conftest import free_port
from tests.ranks import RankError, run_ranks


def _whoami(rank, tag):
    return rank, tag, os.getpid()


def _all_reduce(rank, port):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        return float(t)
    finally:
        dist.destroy_process_group()


def _rank1_raises(rank):
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    return "rank 0 returned"


def _rank1_dies(rank):
    if rank == 1:
        os._exit(3)
    return "rank 0 returned"


def _rank0_blocks_after_rank1_fails(rank):
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    time.sleep(600)  # stands for a collective waiting on the failed rank


def test_results_come_back_by_rank_from_the_same_processes():
    a = run_ranks(_whoami, "a")
    b = run_ranks(_whoami, "b")
    assert [(r, t) for r, t, _ in a] == [(0, "a"), (1, "a")] and [(r, t) for r, t, _ in b] == [(0, "b"), (1, "b")]
    assert [pid for *_, pid in a] == [pid for *_, pid in b] and len({pid for *_, pid in a}) == 2
    assert os.getpid() not in {pid for *_, pid in a}
    assert run_ranks(_all_reduce, free_port()) == [3.0, 3.0]  # a process group of their own, on the pool


def test_a_ranks_error_is_the_calls_error_and_the_pool_serves_on():
    before = [pid for *_, pid in run_ranks(_whoami, "x")]
    with pytest.raises(RankError, match=r"(?s)-- rank 1:.*ValueError: rank 1 fails on purpose"):
        run_ranks(_rank1_raises)
    assert [pid for *_, pid in run_ranks(_whoami, "y")] == before  # both returned: nothing to restart


def test_a_dead_rank_fails_the_call_and_the_next_call_gets_fresh_processes():
    before = [pid for *_, pid in run_ranks(_whoami, "x")]
    with pytest.raises(RankError, match=r"rank 1 died \(exit code 3\)"):
        run_ranks(_rank1_dies)
    after = [pid for *_, pid in run_ranks(_whoami, "y")]
    assert not set(after) & set(before)


def test_a_rank_blocked_after_the_others_error_is_killed_within_the_grace(monkeypatch):
    monkeypatch.setattr(ranks, "GRACE_S", 1.0)
    before = [pid for *_, pid in run_ranks(_whoami, "x")]
    t0 = time.monotonic()
    with pytest.raises(RankError) as e:
        run_ranks(_rank0_blocks_after_rank1_fails)
    assert time.monotonic() - t0 < 30
    assert "rank 0 did not return within the grace after the error" in str(e.value)
    assert "ValueError: rank 1 fails on purpose" in str(e.value)
    assert not set(pid for *_, pid in run_ranks(_whoami, "y")) & set(before)
