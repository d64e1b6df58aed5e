"""Tests against a real SLURM cluster that the session starts on this host (tests/cluster/slurm.py)."""
import sys
from pathlib import Path

# tests/slurm is not a package, so pytest (rootdir-style "prepend" imports) puts only this folder on
# sys.path; the repository root is needed to import tests.cluster. (A tests/conftest.py, a
# tests/slurm/__init__.py or `pythonpath = ["."]` in pytest's settings would do the same.)
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.cluster.fixtures import slurm_cluster, slurm_session  # noqa: E402,F401  (pytest fixtures)


def pytest_collection_modifyitems(config, items):
    """tests/slurm/test_harness.py last among the SLURM tests: it stops the session's cluster (the
    others would only have to start it again). tests/conftest.py then moves every `slurm` test to
    the end of the run, keeping this order."""
    items[:] = sorted(items, key=lambda item: item.path.name == "test_harness.py")
