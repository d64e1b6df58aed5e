"""The real Snakemake workflow on tiny real data: end to end, rerun does nothing, edits rerun only
what they affect, and a config that fails the schema stops with one line."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from barlow import config, layout
from tests.conftest import FMNIST, REPO

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# One xdist worker runs this module and tests/test_workflow_report.py (`make test`): they share finished_run.
pytestmark = pytest.mark.xdist_group("finished_run")
PROBE = {"passes": [{"name": "all_heads", "cached": True, "heads": ["feature1", "feature2", "feature3", "feature4",
                                                                    "feature5", "avgpool"],
                     "epochs": 3, "batch_size": 64, "optimizer": "adamw", "lr": 0.001}]}


def tiny_config(results="results") -> dict:
    over = {"pretrain": {"epochs": 1, "batch_size": 64, "workers": 1}, "probe": {**PROBE, "workers": 1}}
    # json round trip: no shared sub-dicts, which YAML would dump as anchors that alias on reload
    return json.loads(json.dumps({
        "results": results,
        "datasets": {"tiny": {"kind": "fashion_mnist", "path": str(FMNIST), "image_size": 32, "limit_train": 384,
                              "limit_val": 256, "workers": 1}},
        "experiments": {
            "bt": {"dataset": "tiny", "preset": "fmnist_r18", "overrides": over},
            "random": {"dataset": "tiny", "preset": "fmnist_r18",
                       "overrides": {**over, "pretrain": {**over["pretrain"], "init": "random"}}},
        },
        "launcher": {"executor": "local", "pretrain": {"cpus_per_task": 2}, "probe": {"cpus_per_task": 2}},
    }))


def snakemake(workdir: Path, *args: str, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
                           str(workdir / "config.yaml"), "--cores", "2", *args],
                          capture_output=True, text=True, timeout=timeout)


def weights_dir(wd: Path, key: str, smoke: bool = False) -> Path:
    """A run's pretraining folder, where the workflow puts it (barlow.config + barlow.layout)."""
    wf = config.validate_workflow(yaml.safe_load((wd / "config.yaml").read_text()))
    smoke = smoke or config.is_smoke(wf["smoke"])
    runs = config.experiments(wf, smoke)
    results = str(wd / layout.results_dir(wf["results"], smoke))
    return Path(config.weights_folders(results, runs)[key].dir)


def jobs_run(out: str) -> list[str]:
    return re.findall(r"^(?:local)?rule (\w+):", out, flags=re.M)


# finished_run (tests/conftest.py): this module's tiny_config() run to the end once per session.


@pytest.mark.slow
def test_end_to_end_table_csv_and_plots(finished_run):
    wd, r = finished_run
    assert sorted(jobs_run(r.stderr)) == sorted(["convert", "convert", "pretrain", "pretrain", "probe",
                                                 "probe", "merge_probes", "merge_probes", "report", "all"])
    md = (wd / "results" / "benchmark.md").read_text()
    header = "| config | Feature1 | Feature2 | Feature3 | Feature4 | Feature5 | AvgPool |"
    assert header in md
    rows = [line for line in md.splitlines() if line.startswith("| bt |") or line.startswith("| Random init")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 7 and all(re.fullmatch(r"\d{1,3}\.\d\d", c) for c in cells), row  # + kNN
    df = pd.read_csv(wd / "results" / "benchmark.csv")
    cols = ["Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool"]
    assert set(df["config"]) == {"bt", "random"}
    heads = ["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"]
    for _, row in df.iterrows():  # each column is its head's top-1 in that run's probe output
        top1 = json.loads((wd / "results" / "tiny" / row["config"] / "probes.json").read_text())["top1"]
        assert [row[c] for c in cols] == pytest.approx([top1[h] for h in heads], abs=0.005), row["config"]
    # better than chance (10 classes) on the intermediate features even with 384 images
    assert (df[["Feature1", "Feature2", "Feature3"]] > 30).all().all()
    for col in ("commit", "seed", "pretrain_wall_s", "pretrain_epochs", "generated_at", "machine", "config_file"):
        assert df[col].notna().all(), col
    from PIL import Image

    for png, size in (("top1_by_feature.png", (960, 540)), ("pretrain_curves.png", (1320, 480))):
        # written by this run, at its size; what they draw is checked value by value in tests/test_report.py
        assert Image.open(wd / "results" / "plots" / png).size == size
    metrics = pd.read_csv(weights_dir(wd, "bt") / "metrics.csv")
    assert len(metrics) == 6  # 384 // 64 steps, one epoch
    # identity inside the outputs (nothing reads it back out of a path)
    import torch

    w = weights_dir(wd, "bt")
    ident = json.loads((w / "identity.json").read_text())
    assert ident == {"dataset": "tiny", "weights_key": w.name, "runs": ["bt"]}
    assert torch.load(w / "backbone.pth", map_location="cpu", weights_only=False)["identity"] == ident
    probes = json.loads((wd / "results" / "tiny" / "bt" / "probes.json").read_text())
    assert probes["identity"] == {"dataset": "tiny", "experiment": "bt", "seed": None, "weights_key": w.name,
                                  "smoke": False, "metrics": f"../weights/{w.name}/metrics.csv"}


def _copy_run(finished_run, dest: Path) -> Path:
    """A private copy of the finished run (mtimes and Snakemake's metadata kept): the fixture is never edited."""
    import shutil

    wd, _ = finished_run
    shutil.copytree(wd, dest, symlinks=True)
    return dest


def _dry_run_after(wd: Path, edit) -> list[str]:
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    edit(cfg)
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(wd, "-n", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return sorted(jobs_run(r.stdout + r.stderr))


def _bt(cfg):
    return cfg["experiments"]["bt"]["overrides"]


# Runtime knobs (barlow/identity.py RUNTIME, launcher resources): never rerun anything.
RUNTIME_EDITS = {
    "pretrain.workers": lambda c: _bt(c)["pretrain"].update(workers=2),
    "pretrain.checkpoint_every_steps": lambda c: _bt(c)["pretrain"].update(checkpoint_every_steps=7),
    "probe.workers": lambda c: _bt(c)["probe"].update(workers=2),
    "probe.checkpoint_every_steps": lambda c: _bt(c)["probe"].update(checkpoint_every_steps=5),
    "launcher.probe.cpus_per_task": lambda c: c["launcher"]["probe"].update(cpus_per_task=1),
    "pretrain.monitor": lambda c: _bt(c)["pretrain"].update(monitor={"enabled": False}),
}
# Learning settings: exactly the stages they affect, of that experiment only.
LEARNING_EDITS = {
    "pretrain.lr": (lambda c: _bt(c)["pretrain"].update(lr=0.002), ["all", "merge_probes", "pretrain", "probe", "report"]),
    "model.projector": (lambda c: _bt(c).update(model={"projector": [512, 512]}),
                        ["all", "merge_probes", "pretrain", "probe", "report"]),
    "probe pass epochs": (lambda c: _bt(c)["probe"]["passes"][0].update(epochs=2), ["all", "merge_probes", "probe", "report"]),
    "probe.seed": (lambda c: _bt(c)["probe"].update(seed=1), ["all", "merge_probes", "probe", "report"]),
}


@pytest.mark.slow
def test_rerun_does_nothing_and_edits_rerun_exactly_what_they_affect(finished_run, tmp_path):
    wd = _copy_run(finished_run, tmp_path / "run")
    r = snakemake(wd)
    assert r.returncode == 0 and jobs_run(r.stderr) == [], r.stderr[-2000:]
    original = (wd / "config.yaml").read_text()
    for name, edit in RUNTIME_EDITS.items():
        (wd / "config.yaml").write_text(original)
        assert _dry_run_after(wd, edit) == [], name
    for name, (edit, expected) in LEARNING_EDITS.items():
        (wd / "config.yaml").write_text(original)
        assert _dry_run_after(wd, edit) == expected, name


@pytest.mark.slow
def test_a_probe_edit_reruns_only_the_probe(finished_run, tmp_path):
    wd = _copy_run(finished_run, tmp_path / "run")
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    _bt(cfg)["probe"]["passes"][0]["epochs"] = 2
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(jobs_run(r.stderr)) == ["all", "merge_probes", "probe", "report"]


@pytest.mark.parametrize("mutate, pattern", [
    (lambda c: c["experiments"]["bt"]["overrides"]["pretrain"].update(epochs=-1),
     r"^error: config\.experiments\.bt\.pretrain\.epochs: -1 is less than the minimum of 0"),
    (lambda c: c["experiments"]["bt"]["overrides"]["pretrain"].update(batch_size="big"),
     r"^error: config\.experiments\.bt\.pretrain\.batch_size: 'big' is not of type 'integer'"),
    (lambda c: c["experiments"]["bt"]["overrides"]["pretrain"].update(epoch=3),
     r"^error: config\.experiments\.bt\.pretrain: Additional properties are not allowed \('epoch' was unexpected\)"),
    (lambda c: c["datasets"]["tiny"].update(kind="cifar"),
     r"^error: config\.datasets\.tiny\.kind: 'cifar' is not one of"),
    (lambda c: c["experiments"]["bt"].update(preset="nope"),
     r"^error: preset .nope.: unknown; choose one of .*fmnist_r18"),
    (lambda c: c.update(launchr={}),
     r"^error: config: Additional properties are not allowed \('launchr' was unexpected\)"),
    # a dataset's image_size never silently replaces a preset's crop size
    (lambda c: c["experiments"]["bt"].update(preset="imagenet_r50_ep300"),
     r"^error: config\.experiments\.bt: the dataset's image_size 32 contradicts the preset's "
     r"pretrain\.augment\.view1\.size 224"),
])
def test_bad_config_one_line(tmp_path, mutate, pattern):
    cfg = tiny_config()
    mutate(cfg)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), r.stderr[-1500:]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_killed_run_resumes_and_redoes_only_the_rest(tmp_path):
    """SIGKILL the whole Snakemake process group mid-pretraining; the rerun must not convert again
    and must resume pretraining from its checkpoint instead of starting from step 0."""
    import os
    import signal
    import time

    cfg = tiny_config()
    cfg["experiments"]["bt"]["overrides"]["pretrain"].update(epochs=2, checkpoint_every_steps=2)
    del cfg["experiments"]["random"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
           str(tmp_path / "config.yaml"), "--cores", "2"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = weights_dir(tmp_path, "bt") / "metrics.csv"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) > 5:  # header + 4 steps: >= 1 checkpoint
            break
        time.sleep(0.2)
    assert p.poll() is None, "the workflow ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(1)
    assert not (weights_dir(tmp_path, "bt") / "backbone.pth").exists()
    beton_mtime = (tmp_path / "results" / "data" / "tiny" / "train.beton").stat().st_mtime

    unlock = subprocess.run(cmd + ["--unlock"], capture_output=True, text=True, timeout=120)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    r = snakemake(tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(jobs_run(r.stderr)) == ["all", "merge_probes", "pretrain", "probe", "report"]
    assert (tmp_path / "results" / "data" / "tiny" / "train.beton").stat().st_mtime == beton_mtime
    log = Path(layout.pretrain_log(str(tmp_path / "results"), str(weights_dir(tmp_path, "bt")))).read_text()
    resumed = re.search(r"resuming from .*checkpoint.pt at step (\d+)/12", log)
    assert resumed and 2 <= int(resumed.group(1)) < 12, log[-2000:]
    steps = pd.read_csv(metrics)["step"].tolist()
    assert steps == list(range(1, 13))


def test_snakemake_lint_is_clean():
    r = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(REPO), "--lint"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Lints for" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


@pytest.mark.slow
def test_a_failed_conversion_names_the_bad_image_on_the_console(tmp_path):
    from tests.conftest import write_image_folder

    root = write_image_folder(tmp_path / "imgs", per_class=2)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    cfg = tiny_config()
    cfg["datasets"] = {"tiny": {"kind": "image_folder", "path": str(root), "image_size": 32, "workers": 1}}
    del cfg["experiments"]["random"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "--until", "convert", timeout=600)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines and "broken.jpg: unreadable image" in lines[0], r.stderr[-3000:]
    assert not (tmp_path / "results" / "data" / "tiny" / "train.beton").exists()


def test_experiments_with_equal_weights_pretrain_once(tmp_path):
    """imagenet_r50_ep300_fastprobe changes only the probe: one ResNet-50 pretraining, both experiments'
    probes reading it, and the dry run says so."""
    cfg = {"datasets": {"inet": {"kind": "image_folder", "path": str(tmp_path / "imgs"), "image_size": 224}},
           "experiments": {name: {"dataset": "inet", "preset": name}
                           for name in ("imagenet_r50_ep300", "imagenet_r50_ep300_fastprobe")}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "-p", "--config", "smoke=true", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = jobs_run(r.stdout + r.stderr)
    assert {k: jobs.count(k) for k in set(jobs)} == {"convert": 2, "pretrain": 1, "probe": 3, "merge_probes": 2,
                                                     "report": 1, "all": 1}
    assert re.search(r"^note: imagenet_r50_ep300, imagenet_r50_ep300_fastprobe share one pretraining "
                     r"\(inet/weights/resnet50-bt-ep300-seed0-\w+\)$", r.stderr, flags=re.M), r.stderr[-3000:]
    backbones = set(re.findall(r"--backbone (\S+)", r.stdout + r.stderr))
    assert len(backbones) == 1 and "/weights/" in backbones.pop()
