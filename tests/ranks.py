"""One pool of rank processes for the tests that run a function on two ranks (gloo, on this CPU).

``run_ranks(fn, *args)`` stands for ``torch.multiprocessing.spawn(fn, args=args, nprocs=2, join=True)`` and
returns each rank's return value. ``mp.spawn`` starts two fresh interpreters per call, and each imports torch,
FFCV and the test module again (~5 CPU-seconds a process here, 13 calls in the suite); the pool's two
processes are started once per pytest process and serve every call. torch's own helpers have no persistent
pool of this kind (``mp.spawn`` / ``start_processes`` start and join), hence this file.

A function runs as under ``mp.spawn``: ``fn(rank, *args)`` in a spawned process on the caller's CPUs, with
its own process group that it creates and destroys. When a rank raises, the others get a grace period to
return (they may be waiting in a collective for the failed one); past it the pool is killed and the next
call starts a fresh one, so a broken test cannot leave a rank blocked for the next. A rank that dies (a
signal, ``os._exit``) fails the call the same way.
"""
from __future__ import annotations

import atexit
import time
import traceback

import torch.multiprocessing as mp
from multiprocessing.connection import wait

GRACE_S = 20.0  # after the first rank's error: the others' time to return before the pool is killed


class RankError(RuntimeError):
    """A rank raised (its traceback is the message) or died."""


def _serve(rank: int, conn) -> None:
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the test process is gone
            return
        if msg is None:
            return
        fn, args = msg
        try:
            out = ("ok", fn(rank, *args))
        except BaseException:  # noqa: BLE001 - reported to the caller, which fails the test
            out = ("error", traceback.format_exc())
        conn.send(out)


class _Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(world):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(rank, theirs), name=f"test-rank{rank}")
            p.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(p)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def stop(self, timeout: float = 10.0) -> None:
        """A clean exit (coverage writes its data at a process's exit), then a kill for a rank that hangs."""
        for c in self.conns:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """SIGTERM first: a rank that served earlier tests keeps their coverage data (coverage.py saves on SIGTERM:
        pyproject.toml, [tool.coverage.run] sigterm), then SIGKILL for one that does not end."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in self.conns:
            c.close()


_pools: dict[int, _Pool] = {}


def _pool(world: int) -> _Pool:
    pool = _pools.get(world)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.kill()
        pool = _pools[world] = _Pool(world)
    return pool


@atexit.register
def _stop_all() -> None:
    for pool in _pools.values():
        pool.stop()
    _pools.clear()


def run_ranks(fn, *args, world: int = 2, timeout: float = 900.0) -> list:
    """``fn(rank, *args)`` on ranks 0..world-1 at once; their return values in rank order."""
    pool = _pool(world)
    for c in pool.conns:
        c.send((fn, args))
    results, errors = [None] * world, {}
    pending = set(range(world))
    deadline, errors_at = time.monotonic() + timeout, None
    try:
        while pending:
            end = deadline if errors_at is None else min(deadline, errors_at + GRACE_S)
            left = end - time.monotonic()
            if left <= 0:
                break
            ready = wait([pool.conns[r] for r in pending] + [pool.procs[r].sentinel for r in pending], timeout=left)
            for r in sorted(pending):
                if not (pool.conns[r].poll() or pool.procs[r].sentinel in ready):
                    continue
                pending.discard(r)
                try:
                    status, value = pool.conns[r].recv()
                except EOFError:  # its end of the pipe closed: the process is gone
                    pool.procs[r].join(5)
                    status, value = "error", f"rank {r} died (exit code {pool.procs[r].exitcode})"
                (results if status == "ok" else errors)[r] = value
            if errors and errors_at is None:
                errors_at = time.monotonic()
    except BaseException:  # a pytest-timeout or Ctrl-C while the ranks run: they cannot serve the next call
        _pools.pop(world, None)
        pool.kill()
        raise
    if pending:  # past the deadline, or the grace after an error: ranks still busy (blocked)
        _pools.pop(world, None)
        pool.kill()
        for r in pending:
            errors[r] = f"rank {r} did not return within {'the grace after the error' if errors else f'{timeout:.0f} s'}"
    if errors:
        raise RankError("\n".join(f"-- rank {r}:\n{e}" for r, e in sorted(errors.items())))
    return results
