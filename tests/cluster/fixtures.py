"""pytest fixtures for the one-host SLURM cluster (tests/cluster/slurm.py).

Use from a conftest.py: ``from tests.cluster.fixtures import slurm_cluster, slurm_session  # noqa: F401``.
Job ids restart at 1 whenever the cluster is started cold: give every submitit executor a fresh
folder (e.g. ``tmp_path / "submitit"``), never a fixed one.
"""
from __future__ import annotations

import atexit
import os
import signal
from typing import Dict, Iterator, Optional

import pytest

from tests.cluster import slurm


class SlurmSession:
    """The session's cluster, started on first use (restarted if a test stopped it), and stopped at
    the end of the session: by the fixture's finalizer, or by atexit if that never ran (SIGTERM is
    turned into KeyboardInterrupt while the cluster is up, so pytest unwinds and both get to run).

    ``etc_before``: /etc/hosts and /etc/slurm (slurm.etc_snapshot()) as they were just before this
    session first started the cluster; None until then. ``reused_at_start``: the cluster was already
    up (kept running by ``python -m tests.cluster.slurm start`` or another session) and is not ours."""

    def __init__(self) -> None:
        self.cluster: Optional[slurm.Cluster] = None
        self.etc_before: Optional[Dict[str, object]] = None
        self.reused_at_start: Optional[bool] = None
        self._old_sigterm = None
        self._atexit = False

    def get(self) -> slurm.Cluster:
        if os.geteuid() != 0:
            pytest.skip("the SLURM test cluster needs root (it runs daemons and writes /etc/slurm)")
        try:
            slurm.require_installed()
        except slurm.SlurmNotInstalled as exc:
            pytest.fail(str(exc), pytrace=False)
        if self.cluster is None:
            if self.etc_before is None:
                self.etc_before = slurm.etc_snapshot()
            self._arm()
            self.cluster = slurm.start(nodes=2, hold=True)
            if self.reused_at_start is None:
                self.reused_at_start = self.cluster.reused
        return self.cluster

    def stop(self) -> bool:
        """Drop this session's hold and stop the cluster unless someone else holds or keeps it (or
        BARLOW_SLURM_KEEP=1). Returns True if it stopped it. Safe to call twice; SIGTERM and SIGINT
        wait until it is done (a stop cut short is finished by atexit, or by the next run)."""
        if self.cluster is None:
            return False
        deferred = []
        old = {sig: signal.signal(sig, lambda signum, frame: deferred.append(signum))
               for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            stopped = slurm.release(stop_if_unused=os.environ.get("BARLOW_SLURM_KEEP") != "1")
            self.cluster = None
            return stopped
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._disarm()
            for sig in deferred:
                os.kill(os.getpid(), sig)

    def _arm(self) -> None:
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            def _term(signum, frame):  # noqa: ARG001
                raise KeyboardInterrupt("SIGTERM")
            self._old_sigterm = signal.signal(signal.SIGTERM, _term)

    def _disarm(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None


@pytest.fixture(scope="session")
def slurm_session(tmp_path_factory) -> Iterator[SlurmSession]:
    session = SlurmSession()
    try:
        yield session
    finally:
        if session.cluster is not None:
            logs = slurm.save_logs(tmp_path_factory.mktemp("slurm-logs"))
            if logs:
                print(f"\n[slurm-harness] daemon logs of this session: {logs}")
        session.stop()


@pytest.fixture
def slurm_cluster(slurm_session: SlurmSession) -> slurm.Cluster:
    """A running 2-node SLURM cluster (nodes n1, n2; partitions debug (default) and short).

    Started once per session (seconds; an already running healthy cluster is reused at once) and
    stopped at its end, the machine restored (tests/cluster/slurm.py). Fails, saying to run `make
    test`, if the Debian packages are missing (nothing is installed during the tests); skips only
    when not root. At the end of the session the cluster is left up only if another live process (a
    parallel pytest session) still holds it, it was started by ``python -m tests.cluster.slurm
    start``, or BARLOW_SLURM_KEEP=1.
    """
    return slurm_session.get()


def explain(job, cluster) -> str:
    """Everything a failing cluster test should show: SLURM's states, each task's output, the daemons' logs."""
    parts = [f"job {job.job_id}: sacct {cluster.sacct_states(job.job_id)}"]
    for i in range(job.num_tasks):
        task = job.task(i)
        parts.append(f"--- task {i} stdout ---\n{task.stdout() or ''}\n--- task {i} stderr ---\n"
                     f"{(task.stderr() or '')[-3000:]}")
    parts.append(cluster.logs())
    return "\n".join(parts)
