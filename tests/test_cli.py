"""Every CLI error path: one `error:` line on stderr naming the input, exit status 2, no traceback."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


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
    _one_error_line(run_cli(*args), pattern)


def test_missing_classes_from_file(tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    r = run_cli("convert", "--kind", "image_folder", "--path", tmp_path, "--split", "val", "--out",
                tmp_path / "val.beton", "--classes-from", tmp_path / "train.json")
    _one_error_line(r, r"^error: --classes-from .*train.json: no such file; convert the train split first")
    assert not (tmp_path / "val.beton").exists()


def test_probe_without_a_probe_section(tmp_path):
    from barlow.config import resolve

    cfg = resolve("fmnist_r18")
    del cfg["probe"]
    r = run_cli("probe", "--config-json", json.dumps(cfg), "--backbone", tmp_path / "b.pth", "--train",
                tmp_path / "t.beton", "--val", tmp_path / "v.beton", "--out", tmp_path / "p.json")
    _one_error_line(r, r"^error: experiment: has no probe section")


def test_report_of_missing_and_broken_results(tmp_path):
    r = run_cli("report", "--runs", tmp_path / "nope" / "probes.json", "--out-dir", tmp_path / "out")
    _one_error_line(r, r"probes.json: unreadable probe result")
    assert not (tmp_path / "out" / "benchmark.md").exists()


def test_unknown_preset_and_presets_listing():
    _one_error_line(run_cli("estimate", "--preset", "nope"), r"^error: preset 'nope': unknown; choose one of ")
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
