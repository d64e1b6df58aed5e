"""Tests against a real SLURM cluster that the session starts on this host (tests/cluster/slurm.py)."""
import sys
from pathlib import Path

# tests/slurm is not a package, so pytest (rootdir-style "prepend" imports) puts only this folder on
# sys.path; the repository root is needed to import tests.cluster. (A tests/conftest.py, a
# tests/slurm/__init__.py or `pythonpath = ["."]` in pytest's settings would do the same.)
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.cluster.fixtures import slurm_cluster  # noqa: E402,F401  (a pytest fixture)
