"""The pipeline against a real SLURM cluster (tests/cluster/slurm.py: nodes n1, n2 on this host).

1. ``snakemake --profile slurm`` end to end on tiny real data: convert runs through Snakemake's
   SLURM executor, pretraining on 2 nodes (one rank each, gloo) and the probes through submitit;
   the 2-rank result matches a single-process run of the same global batch within tolerance.
2. ``scontrol requeue`` mid-pretraining: the job resumes from its checkpoint, no step is repeated.
3. Snakemake SIGKILLed mid-pretraining: ``--unlock`` and the same command again re-attach to the
   live job instead of submitting a second one.
4. Cluster requests that cannot run stop with one ``error:`` line (exit 2) and submit nothing.

Each test works in its own tmp_path (job ids restart at 1 after a cold cluster start, so submitit
folders are never reused) and, on failure, prints the job logs, sacct states and daemon logs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from barlow import layout, status
from tests.cluster import slurm
from tests.conftest import REPO
from tests.test_workflow import tiny_config, weights_dir

pytestmark = pytest.mark.slurm

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
PROFILE = REPO / "slurm"
# Test-only settings on top of the profile: the first status check after 2 s instead of 40 (the
# plugin then backs off by 10 s per check on its own), and conversion jobs sized for the test nodes
# (2 CPUs, 4000 MB each) instead of the rule's 8000 MB (a real cluster adapts the same way).
FAST = ["--slurm-init-seconds-before-status-checks", "2",
        "--set-resources", "convert:mem_mb=1000", "convert:runtime=10"]
# One CPU per rank, and a time limit far from the job's age (submitit counts a signal in the last
# 20 % of a short limit as a timeout); the probes as small. The probe's memory is set, as a user of
# small nodes would: derived from barlow.estimate (4 GB per task before data, sized for GPU nodes) it
# would exceed the test nodes' 3.9 GB, and the launcher refuses such a request before submitting.
PRETRAIN_JOB = {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "timeout_min": 60, "mem_gb": 2}
PROBE_JOB = {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "timeout_min": 60, "mem_gb": 2}

# Step-1 loss tolerance, 2 ranks x 32 vs 1 process x 64 (same initial weights): the two runs see
# different images at step 1 (FFCV's distributed order is torch's DistributedSampler permutation,
# the single-process order numpy's) with different augmentation draws (seeded per rank), and the
# backbone/projector BatchNorm normalises per rank (no SyncBN on gloo). Measured on 30 batches of
# this data at these weights: the step-1 loss varies by 3.6 % (sd) from batch to batch, and per-rank
# BN on the *same* images changes it by 1.4 % (sd, no bias); the difference of two runs thus has
# sd ~ 5.2 %, and 15 % is ~3 sd. A loss that is not reduced over ranks would still pass this, but
# not the step count (6 = 384 / 64: the data is sharded and the global batch is 64).
STEP1_RTOL = 0.15
# Median loss over the epoch: both runs see all 384 images once; observed difference 1-2 % in the mean, but one
# step of the 2-rank run once spiked to 1.5x (1570 against ~1050, per-rank BN on 32 images) and moved the mean
# 11 %: the median ignores one such step and still moves with a loss that is off at most steps.
EPOCH_RTOL = 0.10


# ----------------------------------------------------------------------------- helpers


def _env(**extra) -> dict:
    """Our environment less anything from an enclosing SLURM job (pytest itself may run in one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))


def _sacct(since: str) -> list[dict]:
    """Jobs (allocations, latest run each) that accounting knows since `since`."""
    res = subprocess.run(["sacct", "-n", "-X", "-P", "-S", since, "-o", "JobID,JobName%200,State,NodeList,NNodes,WorkDir%400"],
                         capture_output=True, text=True, timeout=30)
    rows = []
    for line in res.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 6:
            rows.append(dict(zip(("id", "name", "state", "nodes", "nnodes", "workdir"), parts)))
    return rows


def _jobs_under(root: Path, since: str) -> list[dict]:
    return [r for r in _sacct(since) if r["workdir"] == str(root) or r["workdir"].startswith(f"{root}/")]


def _squeue_ids() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, timeout=30).stdout.split()


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"({e})"


def _diagnose(root: Path, cluster: slurm.Cluster, since: str, *texts: str) -> str:
    """Everything that explains a failure: given outputs, stage and submitit logs, sacct, daemons."""
    parts = [t[-6000:] for t in texts if t]
    for pattern in ("**/results/logs/**/*.log", "**/submitit/*_log.*", "**/.snakemake/slurm_logs/**/*.log", "*.txt"):
        for f in sorted(root.glob(pattern))[:12]:
            parts.append(f"--- {f} ---\n{_tail(f, 2500)}")
    parts.append(f"--- sacct since {since} ---\n" + "\n".join(map(str, _sacct(since))))
    parts.append("--- squeue ---\n" + subprocess.run(["squeue"], capture_output=True, text=True, timeout=30).stdout)
    parts.append(cluster.logs())
    return "\n".join(parts)


@pytest.fixture
def since(slurm_cluster, tmp_path):
    """The test's start time (for sacct); afterwards, cancel any job the test left behind."""
    start = _now()
    yield start
    left = [r["id"] for r in _jobs_under(tmp_path, start) if r["state"] in ("PENDING", "RUNNING", "SUSPENDED",
                                                                          "REQUEUED", "COMPLETING")]
    if left:
        subprocess.run(["scancel", *left], capture_output=True, timeout=30)
        subprocess.run(["scontrol", "resume", *left], capture_output=True, timeout=30)  # a suspended job cancels on resume


def _run(cmd: list[str], timeout: float, root: Path, cluster: slurm.Cluster, since: str,
         **kw) -> subprocess.CompletedProcess:
    """subprocess.run with our environment; a timeout fails the test with the diagnostics."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", _env()),
                              cwd=root, **kw)
    except subprocess.TimeoutExpired as e:
        said = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{' '.join(cmd[:4])} ... still running after {timeout:.0f} s\n{_diagnose(root, cluster, since, said)}")


def _snakemake_cmd(wd: Path, *targets: str) -> list[str]:
    return [SNAKEMAKE, *targets, "-s", str(REPO / "Snakefile"), "--directory", str(wd), "--configfile",
            str(wd / "config.yaml"), "--profile", str(PROFILE), *FAST]


def _workdir(tmp_path: Path, pretrain_job: dict, pretrain_over: dict | None = None) -> Path:
    """A workflow directory: the tiny test config (one experiment), its launcher left on `local`
    so that the profile must be what switches it to SLURM."""
    wd = tmp_path / "wd"
    wd.mkdir()
    cfg = tiny_config()
    del cfg["experiments"]["random"]  # one table row is enough here; it halves the probe jobs
    cfg["experiments"]["bt"]["overrides"]["pretrain"].update(pretrain_over or {})
    cfg["launcher"] = {"executor": "local", "pretrain": pretrain_job, "probe": PROBE_JOB}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    return wd


def _wait_for(cond, timeout: float, what: str, explain, proc: subprocess.Popen | None = None, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}\n{explain()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{explain()}")
        time.sleep(poll)


def _metrics_steps(run_dir: Path) -> int:
    try:
        return max(0, len((run_dir / "metrics.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started and everything below it (by pid; the process first)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


# ----------------------------------------------------------------------------- 1


def test_profile_runs_the_pipeline_with_two_node_pretraining(slurm_cluster, since, tmp_path):
    # a 0.2-epoch warmup: with the default's 1.5 epochs, all 6 steps of this 1-epoch run are warmup and "both learn"
    # below has nothing to see
    wd = _workdir(tmp_path, {**PRETRAIN_JOB, "nodes": 2}, {"warmup_epochs": 0.2})
    t0 = time.monotonic()
    r = _run(_snakemake_cmd(wd), 420, tmp_path, slurm_cluster, since)
    took = time.monotonic() - t0
    explain = lambda: _diagnose(tmp_path, slurm_cluster, since, r.stderr)  # noqa: E731
    assert r.returncode == 0, explain()
    print(f"pipeline through SLURM: {took:.0f} s")

    # the table
    md = (wd / "results" / "benchmark.md").read_text()
    row = next((line for line in md.splitlines() if line.startswith("| bt |")), None)
    assert row is not None, md
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert len(cells) == 7 and all(re.fullmatch(r"\d{1,3}\.\d\d", c) for c in cells), row  # Feature1-5, AvgPool, kNN

    # both ranks' output reached the stage log, from two different nodes
    log = Path(layout.pretrain_log(str(wd / "results"), str(weights_dir(wd, "bt")))).read_text()
    ranks = dict(re.findall(r"^(?:\[rank \d\] )?rank (\d)/2 on \S+ \(SLURMD_NODENAME=(\w+),", log, flags=re.M))
    assert sorted(ranks) == ["0", "1"] and set(ranks.values()) == {"n1", "n2"}, log[-3000:]

    # sacct: both conversions (Snakemake's SLURM executor), pretraining on 2 nodes, the probe
    for j in _jobs_under(wd, since):
        slurm_cluster.wait_job(j["id"], timeout=30)  # until accounting has caught up with the end
    jobs = _jobs_under(wd, since)
    by_name = {}
    for j in jobs:
        by_name.setdefault(j["name"], []).append(j)
    assert [j["state"] for j in by_name.get("pretrain-bt", [])] == ["COMPLETED"], jobs
    pre = by_name["pretrain-bt"][0]
    assert pre["nnodes"] == "2" and pre["nodes"] == "n[1-2]", pre
    # one probe job per evaluation pass (named probe-bt-<pass>; probe-bt where there is one job in all)
    n_passes = len(yaml.safe_load((wd / "config.yaml").read_text())["experiments"]["bt"]["overrides"]["probe"]["passes"])
    probes = [j for j in jobs if j["name"].startswith("probe-bt")]
    assert len(probes) == n_passes and all(j["state"] == "COMPLETED" for j in probes), jobs
    converts = [j for j in jobs if j["name"] != "pretrain-bt" and j not in probes]  # named by Snakemake's run id
    assert len(converts) == 2 and all(j["state"] == "COMPLETED" for j in converts), jobs
    assert "rule convert" in r.stderr and "localrule pretrain" in r.stderr and "localrule probe" in r.stderr

    # the same pretraining in a single process (one rank, the global batch of 64), on the cluster
    run_dir = weights_dir(wd, "bt")
    import torch

    cfg = torch.load(run_dir / "backbone.pth", map_location="cpu", weights_only=False)["config"]
    one = tmp_path / "single" / "backbone.pth"
    t1 = time.monotonic()
    r1 = _run([sys.executable, "-m", "barlow", "pretrain", "--config-json", json.dumps(cfg),
               "--launcher-json", json.dumps({"executor": "slurm", **PRETRAIN_JOB}),
               "--train", str(wd / "results" / "data" / "tiny" / "train.beton"), "--out", str(one)],
              300, tmp_path, slurm_cluster, since)
    assert r1.returncode == 0, _diagnose(tmp_path, slurm_cluster, since, r1.stdout, r1.stderr)
    print(f"single-process reference: {time.monotonic() - t1:.0f} s")
    assert "rank 0/1 on" in r1.stdout

    two, single = pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(one.parent / "metrics.csv")
    assert list(two["step"]) == list(single["step"]) == [1, 2, 3, 4, 5, 6], (two, single)
    assert list(two["lr"]) == pytest.approx(list(single["lr"]))  # the same schedule
    l2, l1 = two["loss"].to_numpy(), single["loss"].to_numpy()
    print(f"loss, 2 ranks:   {l2.round(1).tolist()}\nloss, 1 process: {l1.round(1).tolist()}")
    assert abs(l2[0] - l1[0]) <= STEP1_RTOL * l1[0], (l2, l1)
    m2, m1 = two["loss"].median(), single["loss"].median()
    assert abs(m2 - m1) <= EPOCH_RTOL * m1, (l2, l1)
    assert l2[-1] < l2[0] and l1[-1] < l1[0], (l2, l1)  # both learn


# ----------------------------------------------------------------------------- 2


def test_requeue_mid_pretraining_resumes_from_the_checkpoint(slurm_cluster, since, tmp_path, fmnist_tiny):
    run_dir = tmp_path / "run"
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(
        {"pretrain": {"epochs": 1, "batch_size": 64, "workers": 1, "checkpoint_every_steps": 1}}))
    log = tmp_path / "pretrain.txt"
    cmd = [sys.executable, "-m", "barlow", "pretrain", "--preset", "fmnist_r18", "--config", str(tmp_path / "over.yaml"),
           "--launcher-json", json.dumps({"executor": "slurm", **PRETRAIN_JOB}),
           "--train", str(fmnist_tiny["train"]), "--out", str(run_dir / "backbone.pth")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    explain = lambda: _diagnose(tmp_path, slurm_cluster, since)  # noqa: E731
    try:
        # after step 1 and its checkpoint: the job has run for seconds (a requeue within ~2 s of
        # the start fails)
        _wait_for(lambda: (run_dir / "checkpoint.pt").is_file() and _metrics_steps(run_dir) >= 1, 150,
                  "the first checkpoint", explain, proc)
        job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
        steps_before = _metrics_steps(run_dir)
        assert steps_before < 6, f"training finished before the requeue\n{explain()}"
        rq = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30)
        assert rq.returncode == 0, f"{rq.stderr}\n{explain()}"
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert proc.returncode == 0, explain()
    state = slurm_cluster.wait_job(job_id, timeout=60)
    text = log.read_text()
    assert state == "COMPLETED", f"{state}\n{explain()}"
    found = re.search(r"^resuming from \S+checkpoint\.pt at step (\d+)/6", text, flags=re.M)
    assert found and 1 <= int(found.group(1)) < 6, text
    assert "SIGTERM: SLURM is ending this run" in text, text
    steps = list(pd.read_csv(run_dir / "metrics.csv")["step"])
    assert steps == [1, 2, 3, 4, 5, 6], f"a step repeated or lost: {steps}"
    states = slurm_cluster.sacct_states(job_id)
    assert states[-1] == "COMPLETED" and "REQUEUED" in states[:-1], states
    assert [j["id"] for j in _jobs_under(tmp_path, since)] == [job_id]  # the same job, not a new one
    assert (run_dir / "backbone.pth").is_file()


def _status(config: Path) -> dict[str, dict[str, str]]:
    """`python -m barlow status` as a user types it, by run (the table cut at its header's columns)."""
    r = subprocess.run([sys.executable, "-m", "barlow", "status", "--config", str(config)], capture_output=True,
                       text=True, timeout=60, env=_env(), cwd=config.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    names = [c for c, _ in status.COLUMNS]
    starts = [lines[0].index(n) for n in names]
    return {cells[0]: dict(zip(names, cells)) for cells in
            ([line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])] for line in lines[1:])}


def test_status_shows_a_pending_then_a_running_slurm_job(slurm_cluster, since, tmp_path, fmnist_tiny):
    """The job held at submission (PENDING in SLURM's words), released (RUNNING, at step k of 6): what
    `status` reads from job.json, sacct/squeue and metrics.csv while the launcher waits on it."""
    results = tmp_path / "results"
    (results / "data" / "tiny").mkdir(parents=True)
    for split in ("train", "val"):
        (results / "data" / "tiny" / f"{split}.beton").symlink_to(fmnist_tiny[split])
    over = {"pretrain": {"epochs": 1, "batch_size": 64, "workers": 1, "checkpoint_every_steps": 1,
                         "monitor": {"enabled": False}}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"results": str(results), "datasets": {"tiny": {
        "kind": "fashion_mnist", "path": "/unused", "image_size": 32}}, "experiments": {
        "bt": {"dataset": "tiny", "preset": "fmnist_r18", "overrides": over}}}))
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(over))
    (run,) = status.runs(config)
    cmd = [sys.executable, "-m", "barlow", "pretrain", "--preset", "fmnist_r18", "--config", str(tmp_path / "over.yaml"),
           "--launcher-json", json.dumps({"executor": "slurm", **PRETRAIN_JOB, "additional": {"hold": True}}),
           "--train", str(results / "data" / "tiny" / "train.beton"), "--out", str(run.wdir / "backbone.pth")]
    with open(tmp_path / "pretrain.txt", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    explain = lambda: _diagnose(tmp_path, slurm_cluster, since)  # noqa: E731
    try:
        _wait_for(lambda: (run.wdir / "job.json").is_file(), 60, "the submission", explain, proc)
        job_id = json.loads((run.wdir / "job.json").read_text())["job_id"]
        row = _status(config)["tiny/bt"]
        assert (row["JOB"], row["STATE"], row["STAGE"]) == (job_id, "PENDING", "pretraining queued"), row
        assert row["REQUEUES"] == "-" and row["ETA"] == "-"
        rel = subprocess.run(["scontrol", "release", job_id], capture_output=True, text=True, timeout=30)
        assert rel.returncode == 0, rel.stderr
        _wait_for(lambda: _metrics_steps(run.wdir) >= 2, 150, "two steps", explain, proc)
        row = _status(config)["tiny/bt"]
        assert (row["JOB"], row["STATE"], row["REQUEUES"]) == (job_id, "RUNNING", "0"), row
        assert re.fullmatch(r"pretraining step [2-6] of 6", row["STAGE"]) and row["IMG/S"] != "-", row
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert proc.returncode == 0, explain()
    slurm_cluster.wait_job(job_id, timeout=60)
    row = _status(config)["tiny/bt"]
    assert (row["JOB"], row["STATE"]) == ("-", "-") and row["STAGE"].startswith("probing"), row  # pretraining done


# ----------------------------------------------------------------------------- 3


def test_snakemake_killed_mid_pretraining_reattaches(slurm_cluster, since, tmp_path, fmnist_tiny):
    wd = _workdir(tmp_path, PRETRAIN_JOB)
    data = wd / "results" / "data" / "tiny"
    data.mkdir(parents=True)
    shutil.copy(fmnist_tiny["train"], data / "train.beton")  # converted already: only pretraining runs
    (data / "train.json").write_text("{}\n")
    run_dir = weights_dir(wd, "bt")
    target = str((run_dir / "backbone.pth").relative_to(wd))
    cmd = _snakemake_cmd(wd, target)
    stage_log = Path(layout.pretrain_log(str(wd / "results"), str(run_dir)))
    first_err = tmp_path / "snakemake-1.txt"
    with open(first_err, "w") as err:
        sm = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    explain = lambda *t: _diagnose(tmp_path, slurm_cluster, since, *t)  # noqa: E731
    job_id = None
    try:
        _wait_for(lambda: (run_dir / "job.json").is_file() and _metrics_steps(run_dir) >= 1, 150,
                  "pretraining's first step", explain, sm)
        job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
        # hold the job where it is (SIGSTOP), so that the rerun surely finds it live however fast
        # this machine trains; resumed once the rerun has re-attached
        sus = subprocess.run(["scontrol", "suspend", job_id], capture_output=True, text=True, timeout=30)
        assert sus.returncode == 0, f"{sus.stderr}\n{explain()}"
        assert _metrics_steps(run_dir) < 6, f"training finished before Snakemake was killed\n{explain()}"
        # SIGKILL Snakemake and its local children (the stage's shell, the launcher, tee), not the job
        _kill_tree(sm)
        assert slurm_cluster.job_state(job_id) == "SUSPENDED", explain()

        # What a user does: the same command again. Snakemake refuses (its lock survived the kill)
        # and says to unlock; unlock, then the same command re-attaches.
        again = _run(cmd, 120, tmp_path, slurm_cluster, since)
        assert again.returncode != 0 and "--unlock" in again.stderr, explain(again.stderr)
        unlock = _run(cmd + ["--unlock"], 120, tmp_path, slurm_cluster, since)
        assert unlock.returncode == 0, explain(unlock.stderr)
        second_err = tmp_path / "snakemake-2.txt"
        with open(second_err, "w") as err:
            sm = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
        _wait_for(lambda: stage_log.is_file() and f"re-attaching to SLURM job {job_id}" in stage_log.read_text(), 120,
                  "the rerun to re-attach", explain, sm)
        res = subprocess.run(["scontrol", "resume", job_id], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        sm.wait(timeout=240)
        assert sm.returncode == 0, explain()
    finally:
        if sm.poll() is None:
            _kill_tree(sm)
    assert slurm_cluster.wait_job(job_id, timeout=60) == "COMPLETED", explain()
    log = stage_log.read_text()
    assert f"re-attaching to SLURM job {job_id} (SUSPENDED) from an earlier launch" in log, log
    assert "submitted pretrain" not in log and f"wrote {target} after 6 steps" in log, log
    jobs = [j for j in _jobs_under(wd, since) if j["name"].startswith("pretrain")]
    assert [j["id"] for j in jobs] == [job_id], jobs  # exactly one pretraining job
    assert slurm_cluster.sacct_states(job_id) == ["COMPLETED"]
    assert list(pd.read_csv(run_dir / "metrics.csv")["step"]) == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "backbone.pth").is_file()


# ----------------------------------------------------------------------------- 4


@pytest.mark.parametrize("launcher, path, pattern", [
    ({"partition": "nope"}, None,
     r"launcher\.pretrain\.partition 'nope': no such partition on this cluster \(sinfo lists debug, short\)"),
    # without sinfo on PATH the check is sbatch's own
    ({"partition": "nope"}, "no-sinfo",
     r"launcher\.pretrain\.partition 'nope': sbatch refused the pretrain-run job \(invalid partition specified: nope"),
    ({"cpus_per_task": 64}, None,
     r"launcher\.pretrain\.cpus_per_task 64: 64 CPUs per node .* the largest node in partition debug has 2"),
    ({"nodes": 5}, None, r"launcher\.pretrain\.nodes 5: partition debug has 2 node\(s\)"),
    ({"partition": "short", "timeout_min": 60}, None,
     r"launcher\.pretrain\.timeout_min 60: longer than the time limit of partition short \(5 min\)"),
    ({}, "no-sbatch", r"launcher\.executor slurm: sbatch and srun not found on PATH"),
], ids=["unknown-partition", "unknown-partition-sbatch", "cpus-per-task", "nodes", "time-limit", "no-sbatch"])
def test_bad_cluster_input_one_line_and_nothing_submitted(slurm_cluster, since, tmp_path, fmnist_tiny, launcher,
                                                          path, pattern):
    env = _env()
    if path == "no-sinfo":  # only sbatch and srun (submitit needs both)
        bindir = tmp_path / "bin"
        bindir.mkdir()
        for tool in ("sbatch", "srun"):
            (bindir / tool).symlink_to(shutil.which(tool))
        env["PATH"] = str(bindir)
    elif path == "no-sbatch":
        env["PATH"] = str(tmp_path / "empty")
    queued = _squeue_ids()
    run_dir = tmp_path / "run"
    r = _run([sys.executable, "-m", "barlow", "pretrain", "--preset", "fmnist_r18", "--launcher-json",
              json.dumps({"executor": "slurm", **PRETRAIN_JOB, **launcher}), "--train",
              str(fmnist_tiny["train"]), "--out", str(run_dir / "backbone.pth")], 120, tmp_path, slurm_cluster, since,
             env=env)
    explain = _diagnose(tmp_path, slurm_cluster, since, r.stdout, r.stderr)
    assert r.returncode == 2, explain
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), explain
    assert r.stdout == "", explain
    # nothing submitted, not even half: no job, no record of one
    assert not (run_dir / "job.json").exists()
    # no job of ours in the queue; others' (an earlier test's scancel is asynchronous: its jobs can
    # linger in squeue for seconds) are none of this test's business
    assert not set(_squeue_ids()) - set(queued), explain
    assert _jobs_under(tmp_path, since) == [], explain
