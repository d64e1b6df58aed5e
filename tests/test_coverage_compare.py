"""benchmarks/coverage_compare, run as `make coverage`'s user runs it: lines covered before and not after."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

COMMIT = "6c3bd2efbd48fec24b14793bebe51b297b42a90c"  # any commit of this repository holding barlow/errors.py


def compare(tmp_path, before_lines, after_lines):
    paths = []
    for name, (executed, missing) in (("before", before_lines), ("after", after_lines)):
        report = {"commit": COMMIT, "totals": {"percent_covered": 50.0},
                  "files": {"barlow/errors.py": {"executed_lines": executed, "missing_lines": missing}}}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    return subprocess.run([sys.executable, "-m", "benchmarks.coverage_compare", *map(str, paths)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_a_line_covered_before_and_missed_after_is_named(tmp_path):
    source = subprocess.run(["git", "show", f"{COMMIT}:barlow/errors.py"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    n = next(i for i, line in enumerate(source, 1) if line.startswith("class "))
    r = compare(tmp_path, ([n], []), ([], [n]))
    assert r.returncode == 1 and f"barlow/errors.py:{n}: {source[n - 1].strip()}" in r.stdout, r.stdout + r.stderr
    assert "newly uncovered: 1" in r.stdout
    r = compare(tmp_path, ([], [n]), ([], [n]))  # missed on both sides: nothing lost
    assert r.returncode == 0 and "newly uncovered: 0" in r.stdout, r.stdout + r.stderr
