"""The SLURM harness leaves the machine as it found it (tests/cluster/slurm.py).

1. Stopping the session's cluster (the path the session's finalizer takes) stops every daemon it
   started, frees its ports, removes its state dir, and leaves /etc/hosts and /etc/slurm exactly as
   they were before the session started the cluster.
2. A second, short-lived cluster (1 node named bth1, on other free ports, no accounting) started over
   a foreign slurm.conf (a real cluster's, planted here with its own mode) changes /etc/hosts and
   /etc/slurm while it runs (so the comparison can see a difference) and puts both back byte for
   byte (owner and mode too) when it stops.

Runs last among the SLURM tests (tests/slurm/conftest.py): it stops the session's cluster.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.cluster import slurm
from tests.cluster.fixtures import SlurmSession

pytestmark = pytest.mark.slurm

FOREIGN = b"# a real cluster's slurm.conf (planted by tests/slurm/test_harness.py)\nClusterName=foreign\n"


def _diff(before: dict, after: dict) -> str:
    keys = sorted(set(before) | set(after))
    return "\n".join(f"{k}: before {before.get(k)!r}\n{' ' * len(k)}  after  {after.get(k)!r}"
                     for k in keys if before.get(k) != after.get(k))


def _listening(ports: dict) -> list[int]:
    return [p for p in slurm._all_ports(ports) if slurm._listening_pids(int(p))]


def _assert_all_gone(ports: dict) -> None:
    running = {k: v for k, v in slurm.status()["daemons"].items() if v}
    assert not running, f"daemons still running after stop: {running}"
    assert not _listening(ports), f"ports still listened on after stop: {_listening(ports)} of {ports}"
    assert not slurm.STATE_DIR.exists(), f"{slurm.STATE_DIR} left behind: {sorted(os.listdir(slurm.STATE_DIR))}"


def test_session_cluster_stops_and_restores_etc(slurm_session: SlurmSession) -> None:
    cluster = slurm_session.get()
    if slurm_session.reused_at_start:
        pytest.skip("the cluster was already up before this session (kept by `python -m tests.cluster.slurm "
                    "start` or held by another session): this test would have to stop it")
    assert slurm_session.etc_before is not None
    ports = dict(cluster.ports)
    assert len(set(slurm._all_ports(ports))) == 5, ports  # slurmctld, slurmdbd, mariadb, 2 x slurmd
    assert all(_listening({"x": p}) for p in slurm._all_ports(ports)), f"not all listening: {ports}"
    during = slurm.etc_snapshot()
    assert during[str(slurm.SLURM_CONF)] != slurm_session.etc_before.get(str(slurm.SLURM_CONF))

    assert slurm_session.stop(), "the session's cluster was not stopped (held by another live process?)"
    _assert_all_gone(ports)
    after = slurm.etc_snapshot()
    assert after == slurm_session.etc_before, "/etc differs from before the session:\n" + _diff(
        slurm_session.etc_before, after)


def test_short_lived_cluster_restores_foreign_conf_and_hosts(slurm_session: SlurmSession) -> None:
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root")
    slurm.require_installed()
    slurm_session.stop()  # no-op if test 1 stopped it already
    if any(slurm.status()["daemons"].values()):
        pytest.skip("a cluster kept running (`python -m tests.cluster.slurm start`) or held by another session "
                    "is up: this test would have to stop it")
    planted = not slurm.SLURM_CONF.exists() and not slurm.SLURM_CONF.is_symlink()
    made_dir = not slurm.CONF_DIR.exists()
    if planted:
        slurm.CONF_DIR.mkdir(exist_ok=True)
        slurm.SLURM_CONF.write_bytes(FOREIGN)
        os.chmod(slurm.SLURM_CONF, 0o640)
    try:
        conf_bytes = slurm.SLURM_CONF.read_bytes()
        hosts_bytes = slurm.HOSTS.read_bytes()
        munge_key = slurm.MUNGE_KEY.read_bytes() if slurm.MUNGE_KEY.exists() else None
        before = slurm.etc_snapshot()
        cluster = slurm.start(nodes=1, prefix="bth", accounting=False, timeout=90)
        try:
            assert not cluster.reused and cluster.nodes == ["bth1"]
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                                 timeout=20).stdout.split()
            assert out[:2] == ["bth1", "idle"], out
            during = slurm.etc_snapshot()
            # the comparison sees what the harness changes: it must, or it could not fail
            assert during != before, "the cluster changed nothing in /etc: the comparison would prove nothing"
            assert slurm.SLURM_CONF.read_bytes() != conf_bytes
            assert b"bth1" in slurm.HOSTS.read_bytes() and b"bth1" not in hosts_bytes
        finally:
            slurm.stop()
        _assert_all_gone(cluster.ports)
        after = slurm.etc_snapshot()
        assert after == before, "/etc differs after the short-lived cluster:\n" + _diff(before, after)
        assert slurm.SLURM_CONF.read_bytes() == conf_bytes and slurm.HOSTS.read_bytes() == hosts_bytes
        assert (slurm.MUNGE_KEY.read_bytes() if slurm.MUNGE_KEY.exists() else None) == munge_key
    finally:
        if planted:
            Path(slurm.SLURM_CONF).unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                slurm.CONF_DIR.rmdir()
