"""benchmarks/gpu_smoke: the CPU dry run end to end through the real launch path (submitit's local
executor, 2 tasks over gloo), judged on what its runs left behind (metrics.csv, the jobs' logs, the probe
outputs), not on the harness's own verdicts; and its per-check timeout, with a tiny injected check that
hangs. The CUDA branches need a GPU: not run here (README, "On a GPU")."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_smoke
from benchmarks import gpu_smoke_checks as checks

REPO = gpu_smoke.REPO


# --------------------------------------------------------------------------- injected checks (run by the harness)

def _sleep_in_task(pid_file: str, env=None) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(3600)


def _hang(ctx: dict) -> dict:
    """Hangs as a hung collective would: inside a launched task (submitit's local executor), and here."""
    run = Path(ctx["work"]) / "hang"
    (run / "check.pid").write_text(str(os.getpid()))
    checks.launch(ctx, functools.partial(_sleep_in_task, str(run / "task.pid")), run, "gpu-smoke-hang", "pretrain", 1)
    return {"note": "unreachable"}


def _after(ctx: dict) -> dict:
    return {"note": "ran after the hang"}


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
    # CUDA starts in the env check's process only; the harness (and --help) stays light
    code = "import sys, benchmarks.gpu_smoke as g; g.parse(['--dry-run']); assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--dry-run" in r.stdout and "--out" in r.stdout


def test_the_gpu_plan_fits_8_minutes_on_one_gpu():
    one_gpu = sum(gpu_smoke.planned_s(c, dry_run=False, gpus=1) for c in gpu_smoke.CHECKS)
    assert one_gpu <= gpu_smoke.TARGET_S == 480, one_gpu
    assert gpu_smoke.planned_s(next(c for c in gpu_smoke.CHECKS if c.name == "pretrain_nccl"), False, 1) == 0


def test_the_gpu_sizes_keep_the_imagenet_presets(tmp_path):
    ctx = {"work": str(tmp_path), "dry_run": False, "cpus": 16, "env": {},
           "sizes": {**dataclasses.asdict(checks.GPU), "workers": 8}}
    cfg = checks.experiment(ctx, checks.PRETRAIN)
    m, p = cfg["model"], cfg["pretrain"]
    assert (m["arch"], m["projector"], m["sync_bn"], cfg["data"]["image_size"]) == ("resnet50", [8192] * 3, True, 224)
    assert (p["precision"], p["channels_last"], p["decode"], p["loss"]) == ("fp32", True, "rrc", "as_trained")
    assert (p["batch_size"], p["max_steps"], p["loss_group"]) == (256, 8, 32)  # the recipe's 8 as-trained groups
    assert cfg["probe"]["pooling"] == "published" and [ps["name"] for ps in cfg["probe"]["passes"]] == \
        ["five_feature", "avgpool"]
    accu = checks.experiment(ctx, checks.ACCU4, batch=checks.GPU.accu_batch)["pretrain"]
    assert accu["accumulation"] == 4 and accu["batch_size"] == 256  # 2 tasks x 32 x 4


def test_images_per_s_leaves_out_each_incarnations_first_steps():
    rows = [{"samples_per_s": v, "elapsed_s": t} for v, t in
            ((1.0, 10.0), (100.0, 11.0), (98.0, 12.0), (2.0, 20.0), (102.0, 21.0), (104.0, 22.0))]
    r = checks.rates(rows, batch=100, warmup=1, starts=(0, 3))
    assert r["images_per_s"] == 101.0 and r["measured_steps"] == 4
    assert r["wall_images_per_s"] == pytest.approx(100.0)  # steps 5-6 of the last incarnation: 200 in 2 s


def test_a_hanging_check_times_out_by_name_with_what_it_started_and_the_next_one_runs(tmp_path, capsys):
    hang = gpu_smoke.Check("hang", "tests.test_gpu_smoke:_hang", 0, 0, "hangs in a launched task", (), timeout_s=20)
    after = gpu_smoke.Check("after", "tests.test_gpu_smoke:_after", 0, 0, "runs after it", (), timeout_s=60)
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.time()
    status, record = gpu_smoke.run_checks([hang, after], out=out, work=work, dry_run=True, sizes=checks.DRY,
                                          argv=["(test)"], echo=False)
    printed = capsys.readouterr().out
    assert status == 1 and time.time() - t0 < 120
    assert re.search(r"^\[TIMEOUT\] hang: 2\d\.\d s", printed, re.M), printed
    assert re.search(r"^\[PASS\] after: .*ran after the hang", printed, re.M), printed
    saved = json.loads((out / "gpu_smoke.json").read_text())
    assert saved["checks"]["hang"]["status"] == "TIMEOUT" and saved["checks"]["after"]["status"] == "PASS"
    assert saved["complete"] and not saved["passed"]
    # killed with everything it started: the check, submitit's controller (its job id is its pid), the task
    run = work / "hang"
    pids = [int((run / "check.pid").read_text()), int(json.loads((run / "job.json").read_text())["job_id"])]
    if (run / "task.pid").is_file():  # (the task may not have started within 20 s on a busy machine)
        pids.append(int((run / "task.pid").read_text()))
    time.sleep(1)
    assert not [p for p in pids if _alive(p)], pids
    log = (out / "logs" / "hang.log").read_text()
    assert "in _hang" in log and "timed out after 20 s" in log  # faulthandler's stacks at the kill ...
    if (run / "task.pid").is_file():
        assert "in _sleep_in_task" in log  # ... the task's too (from its submitit log): where it hung


# --------------------------------------------------------------------------- the dry run

@pytest.mark.slow  # ~2 min on 2 idle cores (every check: 9 launches of 1-2 submitit tasks)
def test_the_cpu_dry_run_goes_through_the_launch_path_and_its_runs_are_right(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--dry-run", "--out", str(out), "--work",
                        str(work), "--keep", "--quiet"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1200)
    wall = time.time() - t0
    print(f"dry run: {wall:.0f} s")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    status = dict((n, s) for s, n in re.findall(r"^\[(\w+)\] (\w+):", r.stdout, re.M))
    assert status == {c.name: "SKIP" if c.name == "pretrain_nccl" else "PASS" for c in gpu_smoke.CHECKS}, status
    s = checks.DRY

    # pretrain_resume: killed, relaunched, resumed from its checkpoint, every step once, the last one reached
    import torch

    run = work / "pretrain_resume"
    m = checks.read_metrics(run / "metrics.csv")
    assert [int(x["step"]) for x in m] == list(range(1, s.steps + 1))
    assert all(math.isfinite(x["loss"]) for x in m)
    assert [m[i]["elapsed_s"] for i in range(len(m))] == sorted(x["elapsed_s"] for x in m)  # the wall clock continues
    assert torch.load(run / "backbone.pth", weights_only=False)["steps"] == s.steps
    jobs = sorted(run.glob("submitit/*_submitted.pkl"), key=lambda p: p.stat().st_mtime)
    assert len(jobs) == 2
    killed, resumed = (p.name.split("_")[0] for p in jobs)
    assert not list(run.glob(f"submitit/{killed}_*_result.pkl"))  # the first job never finished
    assert len(list(run.glob(f"submitit/{resumed}_*_result.pkl"))) == 2
    log0 = (run / "submitit" / f"{resumed}_0_log.out").read_text()
    at = int(re.search(r"resuming from \S+checkpoint\.pt at step (\d+)/%d" % s.steps, log0).group(1))
    assert s.resume_at <= at < s.steps
    assert [int(n) for n in re.findall(r"^step (\d+)/\d+ epoch", log0, re.M)] == list(range(at + 1, s.steps + 1))
    for job in (killed, resumed):  # two tasks through distributed.setup(): LOCAL_RANK 1 is one of them
        assert re.search(r"^rank 1/2 on .*device cpu\)", (run / "submitit" / f"{job}_1_log.out").read_text(), re.M)

    # the other pretraining runs: every step once, in the asked precision
    for name, precision, steps in (("pretrain_amp_bf16", "amp_bf16", s.steps), ("pretrain_amp_fp16", "amp_fp16",
                                   s.fp16_steps), ("pretrain_accu4", "fp32", s.steps)):
        blob = torch.load(work / name / "backbone.pth", weights_only=False)
        assert (blob["precision"], blob["steps"]) == (precision, steps), name
        assert [int(x["step"]) for x in checks.read_metrics(work / name / "metrics.csv")] == list(range(1, steps + 1))

    # probes: each pass's output with a finite top-1 for each of its heads, the published passes merged
    def top1(path: Path, heads: list[str]) -> dict:
        got = json.loads(path.read_text())
        assert sorted(got["top1"]) == sorted(heads), path
        assert all(math.isfinite(v) and 0 <= v <= 100 for v in got["top1"].values()), (path, got["top1"])
        return got

    six = checks.HEADS
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
    rec = json.loads((out / "gpu_smoke.json").read_text())
    p = rec["provenance"]
    assert rec["complete"] and p["commit"] and p["host"] and p["torch"] and p["measured_at"] and p["source_sha256"]
    for name in ("loader", "pretrain_resume", "pretrain_amp_bf16", "pretrain_amp_fp16", "pretrain_accu4",
                 "probe_cached", "probe_published"):
        assert isinstance(rec["checks"][name]["images_per_s"], float), name
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(f"{c.name}.log" for c in gpu_smoke.CHECKS)
    assert not (REPO / "benchmarks" / "gpu_smoke.json").exists()
