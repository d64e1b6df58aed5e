"""Every CLI error path: one `error:` line on stderr naming the input, exit status 2, no traceback; and what a
stage's launcher (the process that submits and waits) imports and computes."""
from __future__ import annotations

import json

import pytest

from tests.conftest import cli_in_process, run_cli


def _one_error_line(r, pattern: str) -> None:
    import re

    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("flag, value, pattern", [
    ("--config-json", "{not json", r"^error: --config-json: not valid JSON"),
    ("--launcher-json", "{'executor': 'local'}", r"^error: --launcher-json: not valid JSON"),
    ("--runtime-json", "[1, 2]", r"^error: --runtime-json: a JSON list, expected an object"),
])
def test_malformed_json_arguments(tmp_path, flag, value, pattern):
    args = ["probe", "--backbone", tmp_path / "b.pth", "--train", tmp_path / "t.beton", "--val", tmp_path / "v.beton",
            "--out", tmp_path / "p.json", flag, value]
    if flag != "--config-json":
        args += ["--preset", "fmnist_r18"]
    _one_error_line(cli_in_process(*args), pattern)


def test_missing_classes_from_file(tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    r = cli_in_process("convert", "--kind", "image_folder", "--path", tmp_path, "--split", "val", "--out",
                tmp_path / "val.beton", "--classes-from", tmp_path / "train.json")
    _one_error_line(r, r"^error: --classes-from .*train.json: no such file; convert the train split first")
    assert not (tmp_path / "val.beton").exists()


def test_probe_without_a_probe_section(tmp_path):
    from barlow.config import resolve

    cfg = resolve("fmnist_r18")
    del cfg["probe"]
    r = cli_in_process("probe", "--config-json", json.dumps(cfg), "--backbone", tmp_path / "b.pth", "--train",
                tmp_path / "t.beton", "--val", tmp_path / "v.beton", "--out", tmp_path / "p.json")
    _one_error_line(r, r"^error: experiment: has no probe section")


def test_report_of_missing_and_broken_results(tmp_path):
    r = cli_in_process("report", "--runs", tmp_path / "nope" / "probes.json", "--out-dir", tmp_path / "out")
    _one_error_line(r, r"probes.json: unreadable probe result")
    assert not (tmp_path / "out" / "benchmark.md").exists()


def test_unknown_preset_and_presets_listing():
    _one_error_line(cli_in_process("estimate", "--preset", "nope"), r"^error: preset 'nope': unknown; choose one of ")
    r = run_cli("presets")
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert {"fmnist_r18", "imagenet_r50_ep300", "imagenet_r50_ep300_exact"} <= set(names)
    assert all(len(line.split(None, 1)) == 2 for line in r.stdout.splitlines())  # every preset has a description


@pytest.mark.parametrize("mem_gb, said", [(100, True), (2, False), (400, False)])
def test_pretrain_says_when_its_nodes_cannot_cache_the_train_file(fmnist_tiny, monkeypatch, capsys, mem_gb, said):
    """A 300 GB .beton and mem_gb 100: the stage fits, the file does not (every epoch re-reads it): said before
    submitting. mem_gb 2: the stage itself does not fit, which the launcher says; 400: everything fits.
    (The 2 GB case is the SLURM suite's: it once printed this warning as a second line on stderr.)"""
    from barlow import beton_size, cli, config, launch

    big = beton_size.BetonSize(bytes=300 * 2**30, images=384, source="file", detail="test")
    monkeypatch.setattr(beton_size, "of_file", lambda path: big)
    cfg = config.resolve("fmnist_r18", {}, where="test")
    lc = launch.complete({"executor": "slurm", "mem_gb": mem_gb}, "pretrain")
    for_launcher, hard = cli._pretrain_memory(cfg, str(fmnist_tiny["train"]), lc)
    out = capsys.readouterr().out
    assert 4 < hard < 100 and for_launcher == hard  # (mem_gb given: the launcher weighs the stage alone)
    assert ("warning: launcher.pretrain: the train .beton is 300.0 GB and the job's nodes have 100.0 GB" in out) == said


def test_the_launcher_sizes_the_job_from_the_header_and_says_a_missing_file(fmnist_tiny, tmp_path):
    """What the launcher reads without FFCV is what FFCV says; a missing .beton is FFCV's loader's one line."""
    from barlow.beton_size import images_in, of_file
    from barlow.errors import BadInput
    from barlow.loader import beton_length

    assert images_in(fmnist_tiny["train"]) == beton_length(fmnist_tiny["train"]) == 384
    assert of_file(fmnist_tiny["train"]).bytes == fmnist_tiny["train"].stat().st_size
    with pytest.raises(BadInput, match=r"nope\.beton: missing \.beton file; run the convert stage first"):
        images_in(str(tmp_path / "nope.beton"))


@pytest.mark.parametrize("overrides", [{}, {"pretrain": {"precision": "fp32", "limit_train": 200, "epochs": 3}},
                                       {"pretrain": {"max_steps": 3}}])
def test_the_launchers_expected_hours_are_estimates(fmnist_tiny, overrides):
    """The requeue budget's wall time, counted without torch, is barlow.estimate's pretrain wall_hours."""
    from barlow import cli, config, launch
    from barlow.estimate import estimate

    cfg = config.resolve("fmnist_r18", overrides, where="test")
    lc = launch.complete({"executor": "slurm", "nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4}, "pretrain")
    rows = estimate(cfg, images=384, gpu_tflops=cli.REQUEUE_TFLOPS, gpus=8, gpus_per_node=4)
    expected = next(r["wall_hours"] for r in rows if r["stage"] == "pretrain")
    assert cli._pretrain_hours(cfg, str(fmnist_tiny["train"]), lc) == pytest.approx(expected, rel=1e-12)


HEAVY = {"torch", "ffcv", "numba", "torchvision"}


@pytest.mark.slow  # two real local jobs (~1 min on 2 cores)
def test_a_launcher_imports_neither_torch_nor_ffcv(fmnist_tiny, tmp_path, monkeypatch):
    """Issue 24: `pretrain` / `probe` with --executor local only size the job, submit it and wait; the job runs
    the stage. The launcher process must not import torch, FFCV, numba or torchvision (seconds per stage), even
    on a second launch of a finished pretraining (checkpoint.pt and backbone.pth there: a no-op job)."""
    backbone, probes = tmp_path / "w" / "backbone.pth", tmp_path / "probes" / "all.json"
    pretrain = ["pretrain", "--train", fmnist_tiny["train"], "--out", backbone]
    launches = {"pretrain": pretrain, "probe": ["probe", "--backbone", backbone, "--train", fmnist_tiny["train"],
                                                "--val", fmnist_tiny["val"], "--out", probes], "again": pretrain}
    for name, args in launches.items():
        report = tmp_path / f"{name}.modules"
        monkeypatch.setenv("BARLOW_REPORT_IMPORTS", str(report))
        r = run_cli(*args, "--preset", "fmnist_r18", "--smoke", "--executor", "local")
        assert r.returncode == 0, (name, r.stderr[-3000:])
        assert report.is_file(), f"{name}: BARLOW_REPORT_IMPORTS not written"
        imported = {m.split(".")[0] for m in report.read_text().split()}
        assert "submitit" in imported and not HEAVY & imported, (name, sorted(HEAVY & imported))
        assert "submitted " in r.stdout, r.stdout[-2000:]  # (the work ran in a job, not here)
    assert (backbone.parent / "checkpoint.pt").is_file()
    assert "already exists: training finished earlier; nothing to do" in r.stdout
    assert json.loads(probes.read_text())["top1"]


def test_a_stage_that_trains_nothing_imports_no_dynamo(fmnist_tiny, tmp_path, monkeypatch):
    """A random-init backbone's stage builds a ResNet, runs its step-0 monitor (kNN + linear evaluation) and
    saves; it never steps an optimizer, so torch._dynamo (~1 s of its start: torchvision's import, the monitor's
    optimizer) must stay unimported. The workflow runs this stage for every random-init row."""
    (tmp_path / "c.yaml").write_text("pretrain: {init: random}\n")
    report = tmp_path / "modules"
    monkeypatch.setenv("BARLOW_REPORT_IMPORTS", str(report))
    out = tmp_path / "w" / "backbone.pth"
    r = run_cli("pretrain", "--preset", "fmnist_r18", "--config", tmp_path / "c.yaml", "--smoke",
                "--train", fmnist_tiny["train"], "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    imported = set(report.read_text().split())
    assert {"torchvision", "barlow.monitor", "ffcv"} <= imported, sorted(imported)[:50]
    assert "knn_k20" in (out.parent / "metrics.csv").read_text().splitlines()[0]
    assert not {m for m in imported if m.startswith("torch._dynamo")}

