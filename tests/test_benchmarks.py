"""The committed benchmark figures are complete, self-consistent and traceable to a commit."""
import json
import math
import re
import subprocess

import pytest

from tests.conftest import REPO

RESULTS = REPO / "benchmarks" / "results.json"
REQUIRED = ["loader_full_aug", "pretrain_step", "probe_single_pass", "stage_overhead_s", "default_pipeline_s",
            "peak_rss_mb"]
LOWER_IS_BETTER = {"s", "MiB"}  # times and memory: ratio = peer / ours


@pytest.fixture(scope="module")
def figures():
    return {f["name"]: f for f in json.loads(RESULTS.read_text())}


def test_every_figure_the_issue_names_is_there(figures):
    assert set(REQUIRED) <= set(figures)


def test_ratio_is_oriented_so_that_higher_is_better(figures):
    for f in figures.values():
        unit = f["unit"].split(" ")[0]
        expected = f["peer_value"] / f["value"] if unit in LOWER_IS_BETTER else f["value"] / f["peer_value"]
        assert math.isclose(f["ratio"], expected, rel_tol=2e-3), f["name"]


def test_each_figure_names_a_commit_of_this_repository_and_a_time(figures):
    git = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=REPO, capture_output=True, text=True)
    full_history = git.returncode == 0 and git.stdout.strip() == "false"  # a shallow clone lacks older commits
    for f in figures.values():
        sha = f["commit"].removesuffix("-dirty")
        assert re.fullmatch(r"[0-9a-f]{7,40}", sha), f["name"]
        if full_history:
            assert subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=REPO).returncode == 0, f["name"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", f["measured_at"]), f["name"]
        assert f["machine"] and f["details"]["mode"] in ("full", "quick"), f["name"]


def test_the_comparisons_keep_every_repetition(figures):
    """A ratio of medians is only as good as the runs behind it: they are kept, both sides alike."""
    for name in ("loader_full_aug", "pretrain_step"):
        d = figures[name]["details"]
        ours = d.get("ours_samples_per_s") if name == "loader_full_aug" else d["ours_steps_per_s"]
        peer = d.get("peer_samples_per_s") if name == "loader_full_aug" else d["peer_steps_per_s"]
        assert len(ours) == len(peer) >= 3, name
