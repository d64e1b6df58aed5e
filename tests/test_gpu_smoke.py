"""benchmarks/gpu_smoke, run as a user runs it (``python -m benchmarks.gpu_smoke``; nothing here imports it):
its plan (``--plan``: estimates, timeouts, the experiments at the GPU sizes), the CPU dry run end to end
through the real launch path (submitit's local executor, 2 tasks over gloo), judged on what its runs left
behind (metrics.csv, the jobs' logs, the probe outputs), not on the harness's own verdicts; and its
per-check timeout, on a real check given too little time. The CUDA branches need a GPU: not run here
(README, "On a GPU")."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

HEADS = ["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def gpu_smoke(*args: str, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *kw.pop("python_flags", ()), "-m", "benchmarks.gpu_smoke", *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


def plan(*args: str) -> dict:
    r = gpu_smoke("--plan", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:  # the monitor's columns are empty on steps it did not evaluate
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its parent) is dead too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- quick

def test_the_harness_never_imports_torch():
    # CUDA starts in the env check's process only; the harness (its plan and --help) stays light
    for args in (["--plan", "--dry-run"], ["--plan"], ["--help"]):
        r = gpu_smoke(*args, python_flags=("-X", "importtime"))  # every module it imports, on stderr
        assert r.returncode == 0, r.stderr[-3000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
        assert "benchmarks.gpu_smoke_checks" in imported and "torch" not in imported, args
        if args[0] == "--help":
            assert "--dry-run" in r.stdout and "--out" in r.stdout and "--plan" in r.stdout


def test_the_gpu_plan_fits_8_minutes_on_one_gpu():
    p = plan()
    assert (p["mode"], p["gpus"]) == ("gpu", 1)
    assert p["total_s"] == sum(c["planned_s"] for c in p["checks"]) <= p["target_s"] == 480, p["total_s"]
    assert next(c for c in p["checks"] if c["name"] == "pretrain_nccl")["planned_s"] == 0  # SKIP on one GPU


def test_the_gpu_sizes_keep_the_imagenet_presets():
    exps = plan()["experiments"]
    cfg = exps["imagenet_r50_ep300"]
    m, p = cfg["model"], cfg["pretrain"]
    assert (m["arch"], m["projector"], m["sync_bn"], cfg["data"]["image_size"]) == ("resnet50", [8192] * 3, True, 224)
    assert (p["precision"], p["channels_last"], p["decode"], p["loss"]) == ("fp32", True, "rrc", "as_trained")
    assert (p["batch_size"], p["max_steps"], p["loss_group"]) == (256, 8, 32)  # the recipe's 8 as-trained groups
    assert cfg["probe"]["pooling"] == "published" and [ps["name"] for ps in cfg["probe"]["passes"]] == \
        ["five_feature", "avgpool"]
    accu = exps["imagenet_r50_ep300_accu4"]["pretrain"]
    assert accu["accumulation"] == 4 and accu["batch_size"] == 256  # 2 tasks x 32 x 4


def test_a_check_past_its_timeout_is_killed_by_name_with_what_it_started_and_the_next_one_runs(tmp_path):
    """pretrain_resume given 12 s (it needs ~30 s: two launches of 2 tasks) stands for a hung check."""
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.time()
    r = gpu_smoke("--dry-run", "--only", "pretrain_resume,pretrain_amp_bf16", "--timeout", "pretrain_resume=12",
                  "--out", str(out), "--work", str(work), "--keep", "--quiet", timeout=600)
    assert r.returncode == 1 and time.time() - t0 < 300, (r.stdout + r.stderr)[-4000:]
    assert re.search(r"^\[TIMEOUT\] pretrain_resume: 1\d\.\d s", r.stdout, re.M), r.stdout[-4000:]
    assert re.search(r"^\[PASS\] pretrain_amp_bf16: ", r.stdout, re.M), r.stdout[-4000:]
    saved = json.loads((out / "gpu_smoke.json").read_text())
    res = saved["checks"]["pretrain_resume"]
    assert res["status"] == "TIMEOUT" and saved["checks"]["pretrain_amp_bf16"]["status"] == "PASS"
    assert saved["complete"] and not saved["passed"]
    # killed with everything it started: the check, submitit's controller (its job id is its pid), the tasks
    run = work / "pretrain_resume"
    pids = [res["pid"], int(json.loads((run / "job.json").read_text())["job_id"])]
    pids += [int(f.read_text()) for f in (run / "pids").glob("rank*.pid")]  # (tasks not started in 12 s: none)
    time.sleep(1)
    assert not [p for p in pids if _alive(p)], pids
    log = (out / "logs" / "pretrain_resume.log").read_text()
    assert "in check_pretrain_resume" in log and "timed out after 12 s" in log  # faulthandler's stacks at the kill


# --------------------------------------------------------------------------- the dry run

@pytest.mark.slow  # ~2 min on 2 idle cores (every check: 9 launches of 1-2 submitit tasks)
def test_the_cpu_dry_run_goes_through_the_launch_path_and_its_runs_are_right(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    names = [c["name"] for c in plan("--dry-run")["checks"]]
    t0 = time.time()
    r = gpu_smoke("--dry-run", "--out", str(out), "--work", str(work), "--keep", "--quiet", timeout=1200)
    wall = time.time() - t0
    print(f"dry run: {wall:.0f} s")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    status = dict((n, s) for s, n in re.findall(r"^\[(\w+)\] (\w+):", r.stdout, re.M))
    assert status == {n: "SKIP" if n == "pretrain_nccl" else "PASS" for n in names}, status
    rec = json.loads((out / "gpu_smoke.json").read_text())
    sizes = rec["sizes"]  # the dry run's

    # pretrain_resume: killed, relaunched, resumed from its checkpoint, every step once, the last one reached
    import torch

    run = work / "pretrain_resume"
    m = read_metrics(run / "metrics.csv")
    assert [int(x["step"]) for x in m] == list(range(1, sizes["steps"] + 1))
    assert all(math.isfinite(x["loss"]) for x in m)
    assert [m[i]["elapsed_s"] for i in range(len(m))] == sorted(x["elapsed_s"] for x in m)  # the wall clock continues
    assert torch.load(run / "backbone.pth", weights_only=False)["steps"] == sizes["steps"]
    jobs = sorted(run.glob("submitit/*_submitted.pkl"), key=lambda p: p.stat().st_mtime)
    assert len(jobs) == 2
    killed, resumed = (p.name.split("_")[0] for p in jobs)
    assert not list(run.glob(f"submitit/{killed}_*_result.pkl"))  # the first job never finished
    assert len(list(run.glob(f"submitit/{resumed}_*_result.pkl"))) == 2
    log0 = (run / "submitit" / f"{resumed}_0_log.out").read_text()
    at = int(re.search(r"resuming from \S+checkpoint\.pt at step (\d+)/%d" % sizes["steps"], log0).group(1))
    assert sizes["resume_at"] <= at < sizes["steps"]
    assert [int(n) for n in re.findall(r"^step (\d+)/\d+ epoch", log0, re.M)] == \
        list(range(at + 1, sizes["steps"] + 1))
    # its images/s: the median per-step rate leaving out each incarnation's first warmup steps
    warm = {i for start in (0, at) for i in range(start, start + sizes["warmup"])}
    fig = rec["checks"]["pretrain_resume"]
    assert fig["measured_steps"] == sizes["steps"] - len(warm)
    measured = [x["samples_per_s"] for i, x in enumerate(m) if i not in warm]
    assert fig["images_per_s"] == round(statistics.median(measured), 1)
    for job in (killed, resumed):  # two tasks through distributed.setup(): LOCAL_RANK 1 is one of them
        assert re.search(r"^rank 1/2 on .*device cpu\)", (run / "submitit" / f"{job}_1_log.out").read_text(), re.M)

    # the other pretraining runs: every step once, in the asked precision
    for name, precision, steps in (("pretrain_amp_bf16", "amp_bf16", sizes["steps"]),
                                   ("pretrain_amp_fp16", "amp_fp16", sizes["fp16_steps"]),
                                   ("pretrain_accu4", "fp32", sizes["steps"])):
        blob = torch.load(work / name / "backbone.pth", weights_only=False)
        assert (blob["precision"], blob["steps"]) == (precision, steps), name
        assert [int(x["step"]) for x in read_metrics(work / name / "metrics.csv")] == list(range(1, steps + 1))

    # probes: each pass's output with a finite top-1 for each of its heads, the published passes merged
    def top1(path: Path, heads: list[str]) -> dict:
        got = json.loads(path.read_text())
        assert sorted(got["top1"]) == sorted(heads), path
        assert all(math.isfinite(v) and 0 <= v <= 100 for v in got["top1"].values()), (path, got["top1"])
        return got

    six = HEADS
    top1(work / "probe_published" / "probes" / "five_feature.json", six[:5])
    assert math.isfinite(top1(work / "probe_published" / "probes" / "avgpool.json", ["avgpool"])["knn"]["top1"])
    merged = top1(work / "probe_published" / "probes.json", six)
    assert sorted(merged["passes"]) == ["avgpool", "five_feature"]
    cached = top1(work / "probe_cached" / "probes" / "all_heads.json", six)
    assert cached["config"]["probe"]["passes"][0]["cached"] is True
    for probe_run in (work / "probe_published" / "probes").glob("*/"):
        jid = json.loads((probe_run / "job.json").read_text())["job_id"]
        assert re.search(r"^rank 1/2 on ", (probe_run / "submitit" / f"{jid}_1_log.out").read_text(), re.M)

    # the record: in --out (never the repository), with provenance and a figure per stage
    p = rec["provenance"]
    assert rec["complete"] and p["commit"] and p["host"] and p["torch"] and p["measured_at"] and p["source_sha256"]
    # each stage's figure, recomputed from what its runs left: pretraining's from metrics.csv (the median per-step
    # rate past the warmup steps; by wall: the measured steps' images over their elapsed_s)
    for name, batch in (("pretrain_amp_bf16", sizes["batch"]), ("pretrain_amp_fp16", sizes["batch"]),
                        ("pretrain_accu4", sizes["accu_batch"])):
        rows, fig, w = read_metrics(work / name / "metrics.csv"), rec["checks"][name], sizes["warmup"]
        assert fig["measured_steps"] == len(rows) - w, name
        assert fig["images_per_s"] == round(statistics.median(x["samples_per_s"] for x in rows[w:]), 1), name
        wall = rows[-1]["elapsed_s"] - rows[w - 1]["elapsed_s"]
        assert fig["wall_images_per_s"] == pytest.approx(batch * (len(rows) - w) / wall, abs=0.051), name
    # the probes': backbone forwards counted by hand (cached: train + val once; augmented: every epoch's full
    # batches + val, and the AvgPool pass's kNN bank) over the passes' own probe_wall_s
    n_train, n_val, bs = sizes["train_images"], sizes["val_images"], sizes["probe_batch"]
    for name, passes in (("probe_cached", {"all_heads": n_train + n_val}),
                         ("probe_published", {"five_feature": n_train // bs * bs + n_val,
                                              "avgpool": n_train // bs * bs + n_val + n_train})):
        outs = {n: json.loads((work / name / "probes" / f"{n}.json").read_text()) for n in passes}
        for n, got in outs.items():
            assert (got["train_images"], got["val_images"]) == (n_train, n_val), (name, n)
            if name == "probe_published":  # one epoch each, as counted (smoke mode's augmented passes)
                assert [ps["epochs"] for ps in got["config"]["probe"]["passes"]] == [1], n
        inside = sum(got["probe_wall_s"] for got in outs.values())
        fig = rec["checks"][name]
        assert fig["backbone_forwards"] == sum(passes.values()) and fig["probe_wall_s"] == round(inside, 1), name
        assert fig["images_per_s"] == round(sum(passes.values()) / inside, 1), name
    # the loader's, timed inside its task (nothing else saw those batches): one epoch of full batches, at least
    # its images past the first batch over the check's whole wall
    lo = rec["checks"]["loader"]
    assert lo["batches"] == sizes["train_images"] // sizes["batch"]
    assert lo["images_per_s"] >= sizes["batch"] * (lo["batches"] - 1) / lo["seconds"]
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(f"{n}.log" for n in names)
    assert not (REPO / "benchmarks" / "gpu_smoke.json").exists()
