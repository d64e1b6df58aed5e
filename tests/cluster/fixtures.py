"""pytest fixtures for the one-host SLURM cluster (tests/cluster/slurm.py).

Use from a conftest.py: ``from tests.cluster.fixtures import slurm_cluster  # noqa: F401``.
Job ids restart at 1 whenever the cluster is started cold: give every submitit executor a fresh
folder (e.g. ``tmp_path / "submitit"``), never a fixed one.
"""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.cluster import slurm


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[slurm.Cluster]:
    """A running 2-node SLURM cluster (nodes n1, n2; partitions debug (default) and short).

    Installs the Debian packages if missing and starts every daemon (seconds once installed; an
    already running healthy cluster is reused at once); skips only when that is impossible here
    (not root, or the package registry cannot be reached). At the end of the session the cluster
    is stopped unless another live process (a parallel pytest session) still holds it, it was
    started by ``python -m tests.cluster.slurm start``, or BARLOW_SLURM_KEEP=1.
    """
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (it installs packages and runs daemons)")
    try:
        cluster = slurm.start(nodes=2, hold=True)
    except slurm.SlurmUnavailable as exc:
        pytest.skip(f"no SLURM test cluster: {exc}")
    try:
        yield cluster
    finally:
        slurm.release(stop_if_unused=os.environ.get("BARLOW_SLURM_KEEP") != "1")
