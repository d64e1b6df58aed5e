"""The committed benchmark figures are complete, self-consistent and traceable to a commit."""
import json
import math
import re
import subprocess
import sys

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


SNAKEMAKE_TSV_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def test_stage_walls_come_from_the_rules_benchmark_files(tmp_path):
    """benchmarks.pipeline's per-stage table (run as ``--read WORKDIR``, as a user reads a finished run): the
    wall is the ``s`` column of <results>/benchmarks/<rule>/<name>.tsv, the rule is the TSV's folder, and the
    job's outputs are found through the workflow's own names (here a seeded experiment: its TSVs sit one
    folder deeper)."""
    import torch
    import yaml

    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.yaml").write_text(yaml.safe_dump({
        "results": "out", "datasets": {"tiny_ds": {"kind": "fashion_mnist", "path": "/nowhere"}},
        "experiments": {"bt_r18": {"dataset": "tiny_ds", "preset": "fmnist_r18", "seeds": [1]}}}))
    run = wd / "out" / "tiny_ds" / "bt_r18" / "seed1"  # a run that pretrained in its own folder keeps it
    (run / "probes").mkdir(parents=True)
    torch.save({"wall_s": 4.0}, run / "backbone.pth")
    (run / "probes" / "all_heads.json").write_text(json.dumps({"probe_wall_s": 2.5}))
    bench = wd / "out" / "benchmarks"
    for rel, s in (("probe/tiny_ds_bt_r18/seed1_all_heads.tsv", 7.25), ("pretrain/tiny_ds/bt_r18/seed1.tsv", 9.5),
                   ("probe/other_job.tsv", 3.0)):
        (bench / rel).parent.mkdir(parents=True, exist_ok=True)
        (bench / rel).write_text(SNAKEMAKE_TSV_HEADER + f"{s:.2f}\t0:00:07\t1804.03\t8662.88\t988.31\t1100.61\t0.00\t"
                                 "0.03\t35.76\t9.43\n")
    out = tmp_path / "stages.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--read", str(wd), "--json", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {(row["rule"], row["job"]): row for row in json.loads(out.read_text())}
    # in stage order; a TSV of no job of this config (a stale one) is not read: files are found from the jobs
    assert list(rows) == [("pretrain", "tiny_ds/bt_r18/seed1"), ("probe", "tiny_ds_bt_r18/seed1_all_heads")]
    probe = rows[("probe", "tiny_ds_bt_r18/seed1_all_heads")]
    assert (probe["wall_s"], probe["own_work_s"], probe["overhead_s"]) == (7.25, 2.5, 4.75)
    assert probe["own_work_from"] == "probes/<pass>.json probe_wall_s"
    assert probe["max_rss_mb"] == 1804.03 and probe["cpu_time_s"] == 9.43
    pretrain = rows[("pretrain", "tiny_ds/bt_r18/seed1")]
    assert (pretrain["wall_s"], pretrain["own_work_s"], pretrain["overhead_s"]) == (9.5, 4.0, 5.5)
