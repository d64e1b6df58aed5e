"""Lines of barlow/ that a test run covered before a change and no longer covers after it.

    python -m benchmarks.coverage_compare BEFORE.json AFTER.json
    python -m benchmarks.coverage_compare --stamp coverage.json     (make coverage: records the commit measured)

Each file is ``make coverage``'s ``coverage.json`` (coverage.py's JSON report plus the commit it measured). Line
numbers move between commits, so lines are matched by their text (stripped), read from each file's own commit: a
line of AFTER missed by its run is *newly uncovered* when the same text was executed in BEFORE's file more often
than it is executed now. Coverage.py compares two runs of one tree only (``coverage diff`` does not exist), hence
this script. Exit status 1 when any line is newly uncovered.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def source_lines(commit: str, path: str) -> list[str] | None:
    r = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.splitlines() if r.returncode == 0 else None


def texts(report: dict, path: str, key: str) -> Counter:
    lines = source_lines(report["commit"], path) or []
    return Counter(lines[n - 1].strip() for n in report["files"][path][key] if n <= len(lines))


def newly_uncovered(before: dict, after: dict) -> list[tuple[str, int, str]]:
    out = []
    for path, data in sorted(after["files"].items()):
        if path not in before["files"]:
            continue  # a new module: nothing covered before to lose
        was, now = texts(before, path, "executed_lines"), texts(after, path, "executed_lines")
        lines = source_lines(after["commit"], path) or []
        for n in data["missing_lines"]:
            text = lines[n - 1].strip() if n <= len(lines) else ""
            if text and was[text] > now[text]:
                out.append((path, n, text))
                now[text] += 1  # one lost execution accounted for
    return out


def stamp(path: Path) -> None:
    """Record HEAD in the report; a tree with uncommitted changes to barlow/ cannot be matched to a commit."""
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "barlow"], cwd=REPO).returncode:
        sys.exit(f"{path}: barlow/ has uncommitted changes; commit them so the report names the code it measured")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    report = json.loads(path.read_text())
    report["commit"] = head.stdout.strip()
    # what the comparison reads (the per-function and per-class sections are 5x the size)
    report["files"] = {k: {key: v[key] for key in ("executed_lines", "missing_lines", "summary")}
                       for k, v in report["files"].items()}
    path.write_text(json.dumps(report))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stamp", type=Path, metavar="JSON", help="record HEAD in this coverage.json, compare nothing")
    ap.add_argument("before", type=Path, nargs="?", help="coverage.json of the earlier run (make coverage)")
    ap.add_argument("after", type=Path, nargs="?", help="coverage.json of the later run")
    a = ap.parse_args(argv)
    if a.stamp:
        stamp(a.stamp)
        return 0
    if not (a.before and a.after):
        ap.error("give BEFORE.json and AFTER.json (or --stamp JSON)")
    before, after = (json.loads(p.read_text()) for p in (a.before, a.after))
    for r, p in ((before, a.before), (after, a.after)):
        if "commit" not in r:
            sys.exit(f"{p}: no commit recorded; make it with `make coverage`")
    lost = newly_uncovered(before, after)
    print(f"barlow/ line coverage: {before['totals']['percent_covered']:.2f} % at {before['commit']} -> "
          f"{after['totals']['percent_covered']:.2f} % at {after['commit']}; newly uncovered: {len(lost)}")
    for path, n, text in lost:
        print(f"  {path}:{n}: {text}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
