"""tests/conftest.py's scheduling: an xdist_group runs on one worker under `make test`'s --dist loadgroup."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_an_xdist_group_runs_on_one_worker(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    body = "".join(f'''
@pytest.mark.xdist_group("{group}")
def test_{group}_{i}():
    with open(r"{tmp_path}/{group}_{i}.txt", "w") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"])
    time.sleep(0.3)  # (so that one worker cannot take every test before the other starts)
''' for group in ("a", "b") for i in range(3))
    (tmp_path / "test_groups.py").write_text("import os\nimport time\n\nimport pytest\n" + body)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                        "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path / "test_groups.py")],
                       capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for group in ("a", "b"):
        workers = {(tmp_path / f"{group}_{i}.txt").read_text() for i in range(3)}
        assert len(workers) == 1, (group, workers)
