"""`snakemake --report results/report.html` after a finished run, typed as is (no --cores): the table, every
plot with its caption, the categories; and the rules' benchmark files, which never rerun a finished job."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO
from tests.test_workflow import SNAKEMAKE, _copy_run, jobs_run, snakemake, weights_dir

# the finished_run fixture trains; one xdist worker shares it with tests/test_workflow.py (`make test`)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("finished_run")]

CAPTIONS = REPO / "workflow" / "report"
PLOTS = {"top1_by_feature.png": "top1_by_feature.rst", "pretrain_curves.png": "pretrain_curves.rst",
         "monitor_curves.png": "monitor_curves.rst"}
TABLES = {"benchmark.md": "benchmark_md.rst", "benchmark.csv": "benchmark_csv.rst",
          "benchmark.html": "benchmark_html.rst"}


def report_vars(html: str) -> dict:
    """The report's data, as its page script holds it: `var results = {...};` and so on, one line each."""
    found = dict(re.findall(r"^\s*var (\w+) = (.*);\s*$", html, flags=re.M))
    return {k: json.loads(found[k]) for k in ("results", "categories", "workflow_desc")}


def data_bytes(uri: str) -> bytes:
    assert ";base64," in uri, uri[:80]
    return base64.b64decode(uri.split(";base64,", 1)[1])


def caption_words(rst: Path) -> str:
    """The caption's text before any Jinja field, less its inline markup: what the HTML shows as text."""
    text = re.split(r"\{\{|\{%", rst.read_text())[0]
    text = " ".join(text.replace("``", "").replace("**", "").split())
    assert len(text) >= 40, rst
    return text


def plain(html: str) -> str:
    return " ".join(unescape(re.sub(r"<[^>]+>", "", html)).split())


@pytest.fixture(scope="module")
def report_html(finished_run, tmp_path_factory):
    wd = _copy_run(finished_run, tmp_path_factory.mktemp("report") / "run")
    out = wd / "report.html"
    # exactly as the README types it: no --cores
    r = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(wd), "--configfile",
                        str(wd / "config.yaml"), "--report", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "WARNING" not in r.stderr and "ERROR" not in r.stderr, r.stderr[-3000:]  # docutils on the captions
    return wd, out.read_text()


def test_report_holds_the_table(report_html):
    wd, html = report_html
    data = report_vars(html)["results"]
    res = wd / "results"
    for name in TABLES:
        entry = data[f"results/{name}"]
        assert data_bytes(entry["data_uri"]) == (res / name).read_bytes(), name
    # the HTML view holds the CSV's cells verbatim
    table = data_bytes(data["results/benchmark.html"]["data_uri"]).decode()
    df = pd.read_csv(res / "benchmark.csv", dtype=str, keep_default_na=False)
    for _, row in df.iterrows():
        for col in ("config", "Feature1", "Feature3", "AvgPool", "commit"):
            assert f"<td>{row[col]}</td>" in table, (col, row[col])
    assert re.fullmatch(r"\d{1,3}\.\d\d", df.loc[0, "Feature3"])  # a number, as the CSV writes it


def test_report_holds_every_plot_with_its_caption(report_html):
    wd, html = report_html
    data = report_vars(html)["results"]
    for png, rst in {**PLOTS, **TABLES}.items():
        key = f"results/plots/{png}" if png.endswith(".png") else f"results/{png}"
        entry = data[key]
        if png.endswith(".png"):
            assert entry["mime_type"] == "image/png"
            assert data_bytes(entry["data_uri"]) == (wd / key).read_bytes(), png
        assert caption_words(CAPTIONS / rst) in plain(entry["caption"]), png
    for exp in ("bt", "random"):
        entry = data[f"results/tiny/{exp}/probes.json"]
        assert f"Probe results of {exp} on tiny" in plain(entry["caption"])
        assert entry["labels"] == {"file": "probes.json"}


def test_report_categories_and_description(report_html):
    _, html = report_html
    v = report_vars(html)
    assert v["categories"] == {
        "Benchmark": {"Other": ["results/benchmark.csv", "results/benchmark.html", "results/benchmark.md"]},
        "Plots": {"Other": sorted(f"results/plots/{p}" for p in PLOTS)},
        "tiny": {"bt": ["results/tiny/bt/probes.json"], "random": ["results/tiny/random/probes.json"]},
    }
    desc = plain(v["workflow_desc"])
    assert caption_words(CAPTIONS / "workflow.rst") in desc
    assert "bt: dataset tiny, preset fmnist_r18" in desc and "random: dataset tiny, preset fmnist_r18" in desc


def test_every_rule_writes_a_benchmark_file(finished_run):
    wd, _ = finished_run
    bench = wd / "results" / "benchmarks"
    weights = [weights_dir(wd, k).relative_to(wd / "results") for k in ("bt", "random")]
    expected = {"convert/tiny_train.tsv", "convert/tiny_val.tsv", *(f"pretrain/{w}.tsv" for w in weights),
                "probe/tiny_bt_all_heads.tsv", "probe/tiny_random_all_heads.tsv", "merge_probes/tiny_bt.tsv",
                "merge_probes/tiny_random.tsv", "report.tsv"}
    assert {str(p.relative_to(bench)) for p in bench.rglob("*.tsv")} == expected
    # Each job's wall (``s``) against clocks that are not Snakemake's: at most from the config's writing (before
    # the run started) to its TSV's (written once the job ended), and at least the work the stage logged itself
    # (pretrain: backbone.pth's wall_s, or an untrained backbone's step-0 monitor row; a probe pass: its
    # probe_wall_s); the stages that log no time: more than nothing.
    import torch

    started = (wd / "config.yaml").stat().st_mtime
    own = {}
    for key, w in zip(("bt", "random"), weights):
        blob = torch.load(wd / "results" / w / "backbone.pth", map_location="cpu", weights_only=False)
        csv = wd / "results" / w / "metrics.csv"
        monitor = pd.read_csv(csv).query("step == 0")["monitor_s"].sum() if csv.is_file() else 0.0
        own[f"pretrain/{w}.tsv"] = max(float(blob["wall_s"]), float(monitor))
        pass_json = wd / "results" / "tiny" / key / "probes" / "all_heads.json"
        own[f"probe/tiny_{key}_all_heads.tsv"] = float(json.loads(pass_json.read_text())["probe_wall_s"])
    assert own[f"pretrain/{weights[0]}.tsv"] > 1 and own["probe/tiny_bt_all_heads.tsv"] > 0, own  # bt trained
    for name in sorted(expected):
        t = pd.read_csv(bench / name, sep="\t")
        assert len(t) == 1, name
        s, ceiling = float(t.loc[0, "s"]), (bench / name).stat().st_mtime - started + 0.01
        assert own.get(name, 0.0) - 0.05 <= s <= ceiling and s > 0, (name, s, own.get(name), ceiling)


def test_a_run_without_benchmark_files_is_not_rerun(finished_run, tmp_path):
    """A run finished before the rules had `benchmark:` has no such files: nothing may rerun for them."""
    wd = _copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(wd / "results" / "benchmarks")
    r = snakemake(wd, "-n", timeout=300)
    assert r.returncode == 0 and jobs_run(r.stdout + r.stderr) == [], (r.stdout + r.stderr)[-3000:]
