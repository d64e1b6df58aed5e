"""Who trains a run folder: rank 0 holds a lock on the output directory so that a second launcher (e.g.
a rerun after Snakemake died) waits instead of training twice, and tells every rank the verdict
(``claim``) before any of them enters a collective."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from barlow.atomic import clean_stale
from barlow.errors import BadInput
from barlow.lock import LockTimeout, exclusive

TRAIN, DONE, FAILED = 0, 1, 2
# Rank 0's longest wait for the output lock, as a share of the process group's timeout, which the other
# ranks spend waiting for the verdict: at the default 45 min, 40.5 min, beyond the fallback lock's stale
# takeover (lock.STALE_S, 30 min) after a holder was killed on another node.
LOCK_WAIT_SHARE = 0.9


@contextlib.contextmanager
def claim(out: Path, env):
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

