"""`python -m barlow status` on real tiny runs: one finished through the real CLI stages, one killed
mid-pretraining, one failed, one waiting for its input; it imports neither torch nor FFCV."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from barlow import layout, status
from barlow.errors import BadInput
from tests.conftest import FMNIST, REPO, run_cli

PROBE = {"workers": 1, "passes": [{"name": "all_heads", "cached": True, "heads": ["feature1", "feature2", "feature3",
                                                                               "feature4", "feature5", "avgpool"],
                                   "epochs": 3, "batch_size": 64, "optimizer": "adamw", "lr": 0.001}]}
QUIET = {"workers": 1, "monitor": {"enabled": False}}
EXPERIMENTS = {
    "bt": {"pretrain": {"epochs": 1, "batch_size": 64, **QUIET}, "probe": PROBE},                  # 6 steps
    "killed": {"pretrain": {"epochs": 10, "batch_size": 32, "checkpoint_every_steps": 1, **QUIET}},  # 120 steps
    "failing": {"pretrain": {"epochs": 1, "batch_size": 1024, **QUIET}},  # more than the 384 images
}


@pytest.fixture(scope="module")
def wf(tmp_path_factory, fmnist_tiny) -> dict:
    """A workflow config whose results directory holds the tiny .beton files where convert puts them."""
    root = tmp_path_factory.mktemp("status")
    results = root / "results"
    data = results / "data" / "tiny"
    data.mkdir(parents=True)
    for split in ("train", "val"):
        (data / f"{split}.beton").symlink_to(fmnist_tiny[split])
    ds = {"kind": "fashion_mnist", "path": str(FMNIST), "image_size": 32, "workers": 1}
    experiments = {name: {"dataset": "tiny", "preset": "fmnist_r18", "overrides": over}
                   for name, over in EXPERIMENTS.items()}
    experiments["waiting"] = {"dataset": "elsewhere", "preset": "fmnist_r18"}
    experiments["seeded"] = {"dataset": "tiny", "preset": "fmnist_r18", "seeds": [0, 3]}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"results": str(results), "datasets": {"tiny": ds, "elsewhere": ds},
                                      "experiments": experiments}, sort_keys=False))
    overrides = {}
    for name, over in EXPERIMENTS.items():
        overrides[name] = root / f"{name}.yaml"
        overrides[name].write_text(yaml.safe_dump(over))
    return {"root": root, "config": config, "results": results, "train": data / "train.beton",
            "val": data / "val.beton", "overrides": overrides}


def parse(text: str) -> dict[str, dict[str, str]]:
    """The table, by run: each column cut at its header's position (columns are left-aligned)."""
    lines = [line for line in text.splitlines() if line.strip()]
    head = next(i for i, line in enumerate(lines) if line.startswith("RUN "))
    names = [c for c, _ in status.COLUMNS]
    starts = [lines[head].index(n) for n in names]
    out = {}
    for line in lines[head + 1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        out[cells[0]] = dict(zip(names, cells))
    return out


def table(wf, now=None) -> dict[str, dict[str, str]]:
    return parse(status.table(status.rows(status.runs(wf["config"])), now=now))


def weights(wf, name: str) -> Path:
    """The run's pretraining folder, as the workflow would put it (barlow.layout)."""
    return next(r.wdir for r in status.runs(wf["config"]) if r.key == name)


def pretrain_args(wf, name: str, *extra: str) -> list[str]:
    return ["pretrain", "--preset", "fmnist_r18", "--config", str(wf["overrides"][name]), "--train", str(wf["train"]),
            "--out", str(weights(wf, name) / "backbone.pth"), *extra]


# ---- resolution and what the files hold (no process) --------------------------------------------------
def test_runs_are_the_workflows(wf, tmp_path):
    runs = {r.name: r for r in status.runs(wf["config"])}
    assert list(runs) == ["tiny/bt", "tiny/killed", "tiny/failing", "elsewhere/waiting", "tiny/seeded/seed0",
                          "tiny/seeded/seed3"]  # common.smk's keys: <experiment>[/seed<k>]
    assert runs["tiny/seeded/seed3"].dir == wf["results"] / "tiny" / "seeded" / "seed3"
    assert runs["tiny/seeded/seed3"].cfg["pretrain"]["seed"] == runs["tiny/seeded/seed3"].cfg["probe"]["seed"] == 3
    assert status.total_steps(runs["tiny/killed"].cfg, 384) == 120 and status.total_steps(runs["tiny/bt"].cfg, 384) == 6
    smoke = {r.name: r for r in status.runs(wf["config"], smoke=True)}
    assert smoke["tiny/bt"].dir == wf["results"] / "smoke" / "tiny" / "bt"
    assert status.total_steps(smoke["tiny/bt"].cfg, 384) == 2  # smoke mode's 2 steps
    bad = yaml.safe_load(wf["config"].read_text())
    bad["experiments"]["bt"]["dataset"] = "nope"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(BadInput, match=r"config.experiments.bt.dataset 'nope': not in datasets"):
        status.runs(tmp_path / "bad.yaml")


def test_ages_read_as_a_person_would():
    assert [status._fmt_age(s) for s in (None, 4.4, 65, 3 * 3600 + 120, 2 * 86400 + 3600)] == \
        ["-", "4s", "1m05s", "3h02m", "2d01h"]


def test_waiting_converting_and_failed_conversion(wf):
    data = wf["results"] / "data" / "elsewhere"
    assert table(wf)["elsewhere/waiting"]["STAGE"] == "waiting for input (train.beton)"
    data.mkdir(parents=True)
    tmp = data / ".train.beton.k2x9.tmp"  # barlow.atomic's name for a .beton being written
    tmp.write_bytes(b"")
    assert table(wf)["elsewhere/waiting"]["STAGE"] == "converting train"
    tmp.unlink()
    log = wf["results"] / "logs" / "convert" / "elsewhere_train.log"
    log.parent.mkdir(parents=True)
    log.write_text("error: /nowhere: not a Fashion-MNIST folder\n")
    assert table(wf)["elsewhere/waiting"]["STAGE"] == "failed (convert train): error: /nowhere: not a Fashion-MNIST folder"
    log.unlink()
    assert table(wf)["tiny/seeded/seed0"]["STAGE"] == "pretraining not started"


# ---- real runs --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finished_run_is_done_with_its_wall_time_without_torch(wf):
    run, w = wf["results"] / "tiny" / "bt", weights(wf, "bt")
    assert w.parent.name == "weights"  # the layout's, not the run's folder
    r = run_cli(*pretrain_args(wf, "bt"))
    assert r.returncode == 0, r.stderr[-3000:]
    part = run / "probes" / "all_heads.json"
    r = run_cli("probe", "--preset", "fmnist_r18", "--config", wf["overrides"]["bt"], "--backbone", w / "backbone.pth",
                "--train", wf["train"], "--val", wf["val"], "--out", part)
    assert r.returncode == 0, r.stderr[-3000:]
    assert parse(status.table(status.rows(status.runs(wf["config"]))))["tiny/bt"]["STAGE"] == "merging probes"
    r = run_cli("merge-probes", "--parts", part, "--out", run / "probes.json")
    assert r.returncode == 0, r.stderr[-3000:]

    code = ("import sys, barlow.status as s; s.show(sys.argv[1]); "
            "bad = [m for m in ('torch', 'ffcv', 'submitit') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(wf["config"])], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=wf["root"])
    assert r.returncode == 0, r.stderr[-3000:]
    row = parse(r.stdout)["tiny/bt"]
    blob = json.loads((run / "probes.json").read_text())
    assert row["STAGE"] == "done"
    assert row["WALL"] == status._fmt_age(blob["pretrain_wall_s"] + blob["probe_wall_s"]) != "-"
    assert row["IMG/S"] != "-" and row["ETA"] == "-" and row["CKPT AGE"] == "-"

    t0 = time.perf_counter()
    r = run_cli("status", "--config", wf["config"], cwd=wf["root"])  # the command as a user types it
    took = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert parse(r.stdout)["tiny/bt"]["STAGE"] == "done"
    print(f"python -m barlow status: {took:.2f} s")
    assert took < 5  # ~0.3-0.4 s on an idle 2-core machine; generous for a loaded one


@pytest.mark.slow
def test_killed_run_shows_its_step_and_checkpoint_age(wf):
    run = weights(wf, "killed")
    ckpt = run / "checkpoint.pt"
    with open(wf["root"] / "killed.log", "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "barlow", *pretrain_args(wf, "killed")], stdout=log,
                             stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 240
        while not ckpt.is_file() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.is_file(), (wf["root"] / "killed.log").read_text()[-3000:]
        assert table(wf)["tiny/killed"]["STAGE"].startswith("pretraining step ")  # while it runs
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (run / "backbone.pth").exists()
    with open(run / "metrics.csv", newline="") as f:
        step = int(list(csv.DictReader(f))[-1]["step"])
    row = table(wf, now=ckpt.stat().st_mtime + 65)["tiny/killed"]
    assert row["STAGE"] == f"pretraining step {step} of 120"
    assert row["CKPT AGE"] == "1m05s" and row["ETA"] != "-" and row["IMG/S"] != "-" and row["JOB"] == "-"
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["total"] == 120 and 1 <= state["step"] <= step  # the trainer's own count agrees


@pytest.mark.slow
def test_failed_run_shows_its_one_line_error(wf):
    run = weights(wf, "failing")
    r = run_cli(*pretrain_args(wf, "failing", "--executor", "local"))  # a submitit job: job.json, its logs
    assert r.returncode != 0
    log = Path(layout.pretrain_log(str(wf["results"]), str(run)))  # what the rule's `2>&1 | tee {log}` keeps
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(r.stdout + r.stderr)
    want = ("failed (pretraining): error: " + str(wf["train"]) +
            ": 384 images, fewer than one batch of 1024; lower pretrain.batch_size")
    row = table(wf)["tiny/failing"]
    assert row["STAGE"] == want
    job = json.loads((run / "job.json").read_text())["job_id"]
    assert (row["JOB"], row["STATE"], row["REQUEUES"]) == (job, "ended", "0")
    log.unlink()  # run without Snakemake: the job's own stderr says it
    assert table(wf)["tiny/failing"]["STAGE"] == want
    # progress after the error (a later attempt) makes it an old error
    for p in (run / "submitit").iterdir():
        os.utime(p, (time.time() - 60, time.time() - 60))
    (run / "metrics.csv").write_text("step,epoch,loss,lr,samples_per_s,elapsed_s\n1,0.5,900.0,0.001,50.0,2.0\n")
    assert table(wf)["tiny/failing"]["STAGE"] == "pretraining step 1 of ?"  # 0 steps an epoch: N unknown


def test_watch_repeats_until_ctrl_c(wf):
    p = subprocess.Popen([sys.executable, "-m", "barlow", "status", "--config", str(wf["config"]), "--watch", "0.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        seen = 0
        deadline = time.monotonic() + 30
        while seen < 2 and time.monotonic() < deadline:
            seen += p.stdout.readline().startswith("RUN ")
        assert seen == 2
    finally:
        p.send_signal(signal.SIGINT)
        # communicate, not wait: the tables it writes until the signal lands must be read, or a full pipe blocks
        # its exit (a wait timed out once under load)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err[-2000:]


def test_help_says_what_each_column_means():
    r = run_cli("status", "--help")
    assert r.returncode == 0
    for name, what in status.COLUMNS:
        assert f"  {name} " in r.stdout and what.split()[0] in r.stdout


def test_eta_of_a_run_with_one_timed_step_uses_its_images_per_second():
    """Which ETA branch a live run takes depends on how many rows it has logged when status reads it: both by hand."""
    from barlow.status import _eta

    one = [{"step": 3, "elapsed_s": 2.0, "samples_per_s": 64.0}]
    assert _eta(one, total=10, batch=32) == 7 * 32 / 64.0  # 7 steps left at 0.5 s a step
    two = one + [{"step": 5, "elapsed_s": 5.0, "samples_per_s": 64.0}]
    assert _eta(two, total=10, batch=32) == 5 * (5.0 - 2.0) / 2  # the window's own pace: 1.5 s a step
    assert _eta(one, total=None, batch=32) is None and _eta([{**one[0], "samples_per_s": 0}], 10, 32) is None
