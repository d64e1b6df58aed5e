"""The fine-tune through the real Snakemake workflow: an experiment with `finetune: true` gets one job per
fraction and FT columns holding its JSONs' numbers (added to a finished run, it reruns nothing of it); a rerun does nothing and a probe edit reruns no fine-tune;
the default config.yaml schedules none."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from barlow import layout
from tests.conftest import REPO
from tests.test_workflow import _copy_run, jobs_run, snakemake

FRACTIONS = [10, 20]  # of tiny's 384 train images: 38 and 77, balanced over the 10 classes


def _add_finetune(cfg: dict) -> dict:
    bt = cfg["experiments"]["bt"]
    bt["finetune"] = True
    bt["overrides"]["finetune"] = {"fractions": FRACTIONS, "epochs": 1, "batch_size": 16, "workers": 1}
    cfg["launcher"]["finetune"] = {"cpus_per_task": 2}
    return cfg


@pytest.mark.slow
@pytest.mark.xdist_group("finished_run")  # (its worker has the finished run: tests/test_workflow.py)
def test_finetune_jobs_columns_rerun_nothing_and_a_probe_edit_spares_them(finished_run, tmp_path):
    """Fine-tuning added to a finished run: its two jobs and the report run, nothing of the run before them."""
    wd = _copy_run(finished_run, tmp_path / "run")
    (wd / "config.yaml").write_text(yaml.safe_dump(_add_finetune(yaml.safe_load((wd / "config.yaml").read_text()))))
    r = snakemake(wd, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(jobs_run(r.stderr)) == sorted(["finetune", "finetune", "report", "all"])
    res = wd / "results"
    results = {p: json.loads(open(layout.finetune_file(str(res), "tiny", "bt", p)).read()) for p in FRACTIONS}
    assert {p: (r["percent"], r["train_images"], r["epochs"], r["identity"]["percent"]) for p, r in results.items()} \
        == {10: (10, 38, 1, 10), 20: (20, 77, 1, 20)}
    assert not list(res.rglob("*.checkpoint.pt"))  # deleted once each result was written
    md = (res / "benchmark.md").read_text()
    assert "| FT10% top-1 | FT10% top-5 | FT20% top-1 | FT20% top-5 |" in md
    row = next(x for x in md.splitlines() if x.startswith("| bt |"))
    want = [f"{results[p][m]:.2f}" for p in FRACTIONS for m in ("top1", "top5")]
    assert [c.strip() for c in row.strip("|").split("|")][-4:] == want
    csv = pd.read_csv(res / "benchmark.csv").set_index("config")
    assert csv.loc["bt", "ft20_subset_sha256"] == results[20]["subset_sha256"]
    assert pd.isna(csv.loc["random", "ft20_subset_sha256"])  # (not fine-tuned)

    mtimes = {p: p.stat().st_mtime_ns for p in (res / "tiny" / "bt" / "finetune").iterdir()}
    r = snakemake(wd, timeout=300)
    assert r.returncode == 0 and jobs_run(r.stderr) == [], r.stderr[-3000:]

    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["experiments"]["bt"]["overrides"]["probe"]["passes"][0]["lr"] = 0.002
    cfg["experiments"]["bt"]["overrides"]["finetune"]["workers"] = 2  # a runtime knob: no rerun either
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(wd, "-n", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(jobs_run(r.stdout + r.stderr)) == ["all", "merge_probes", "probe", "report"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_the_default_config_schedules_no_finetune(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["reference"] = []  # (the committed reference runs are the report's inputs, not under tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = jobs_run(r.stdout + r.stderr)
    assert "pretrain" in jobs and "finetune" not in jobs
