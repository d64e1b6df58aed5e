"""A run finished in the layout before weights folders (commit 541840b: `<dataset>/<experiment>/backbone.pth`)
is neither retrained nor lost by today's workflow: its weights stay where they are, no stage's work is
scheduled again, and the table is made from it."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from barlow import status
from tests.conftest import REPO
from tests.test_workflow import SNAKEMAKE, jobs_run, snakemake, tiny_config

V1 = REPO / "tests" / "fixtures" / "workflow_541840b" / "Snakefile"  # that commit's rules, verbatim


@pytest.mark.slow
def test_a_run_finished_in_the_earlier_layout_is_not_rerun(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    # that workflow's own stages up to the merged probes.json (its rule `probe`); its report
    # rule is today's report's job
    r = subprocess.run([SNAKEMAKE, "-s", str(V1), "--directory", str(tmp_path), "--configfile",
                        str(tmp_path / "config.yaml"), "--cores", "2", "--until", "probe"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(jobs_run(r.stderr)) == sorted(["convert"] * 2 + ["pretrain"] * 2 + ["probe_pass"] * 2 + ["probe"] * 2)
    res = tmp_path / "results"
    done = {p: p.stat().st_mtime_ns for p in res.rglob("*") if p.is_file() and "logs" not in p.parts}
    assert (res / "tiny" / "bt" / "backbone.pth") in done and (res / "tiny" / "bt" / "probes.json") in done

    r = snakemake(tmp_path, "-n", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(jobs_run(r.stdout + r.stderr)) == ["all", "report"], (r.stdout + r.stderr)[-3000:]
    r = snakemake(tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(jobs_run(r.stderr)) == ["all", "report"]
    assert {p: p.stat().st_mtime_ns for p in done} == done  # nothing rewritten, nothing moved
    assert not (res / "tiny" / "weights").exists()

    table = pd.read_csv(res / "benchmark.csv")
    assert sorted(table["config"]) == ["bt", "random"] and table["Feature1"].notna().all()
    assert table["pretrain_wall_s"].notna().all()
    monkeypatch.chdir(tmp_path)  # status reads the paths as Snakemake does: relative to the workflow's folder
    runs = status.runs("config.yaml")
    assert [r.wdir for r in runs] == [Path("results/tiny/bt"), Path("results/tiny/random")]  # where they were
    assert [row.stage for row in status.rows(runs)] == ["done", "done"]
