"""The one-host SLURM test cluster works the way the pipeline uses SLURM: sinfo/sacct answer,
submitit runs a 2-node torch.distributed (gloo) job, and a Checkpointable job survives a requeue.

Every submitit folder is fresh (under tmp_path): job ids restart at 1 after a cold start.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from tests.cluster import slurm
from tests.cluster.fixtures import explain

pytestmark = pytest.mark.slurm

# The job callables below live in this test module, which the job's interpreter cannot import
# by name (pytest put tests/slurm on sys.path, not the job): pickle them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _executor(folder: Path, cluster: slurm.Cluster, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = {"slurm_partition": cluster.partition, "timeout_min": 5, "cpus_per_task": 1, **params}
    ex.update_parameters(**params)
    return ex


def _wait_done(job: submitit.Job, cluster: slurm.Cluster, timeout: float) -> str:
    try:
        return cluster.wait_job(job.job_id, timeout=timeout)
    except TimeoutError as exc:
        subprocess.run(["scancel", job.job_id], check=False)
        pytest.fail(f"{exc}\n{explain(job, cluster)}")


# ----------------------------------------------------------------------------- (a)


def test_sinfo_shows_idle_nodes_and_sacct_answers(slurm_cluster: slurm.Cluster) -> None:
    slurm_cluster.wait_idle(timeout=60)
    env = dict(os.environ, **slurm_cluster.env())
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %P %c"], capture_output=True, text=True,
                         env=env, check=True, timeout=10).stdout.split("\n")
    rows = {tuple(line.split()) for line in out if line.strip()}
    for node in ("n1", "n2"):
        assert (node, "idle", "debug*", "2") in rows, rows
        assert (node, "idle", "short", "2") in rows, rows
    assert slurm_cluster.nodes == ["n1", "n2"] and slurm_cluster.partition == "debug"
    parts = subprocess.run(["sinfo", "-h", "-o", "%P %l %D"], capture_output=True, text=True, env=env,
                           check=True, timeout=10).stdout.split()
    assert parts == ["debug*", "infinite", "2", "short", "5:00", "2"], parts
    sacct = subprocess.run(["sacct", "-n", "-X", "-o", "JobID,State"], capture_output=True, text=True,
                           env=env, timeout=10)
    assert sacct.returncode == 0, sacct.stderr


def _daemon_pids() -> dict:
    return dict(slurm.status()["daemons"])


def test_start_again_reuses_the_running_cluster(slurm_cluster: slurm.Cluster) -> None:
    """A second start() leaves the running daemons alone. (Not timed: its health checks ask sinfo,
    sacct, munge and MariaDB, which a loaded 2-core machine may answer slowly; issue 13.)"""
    before = _daemon_pids()
    t0 = time.monotonic()
    again = slurm.start(nodes=2)
    took = time.monotonic() - t0
    assert again.reused and again.nodes == slurm_cluster.nodes
    assert all(before.values()) and _daemon_pids() == before, (before, _daemon_pids())
    print(f"start() on the running cluster: {took:.2f} s")


# ----------------------------------------------------------------------------- (b)


def _gloo_all_reduce() -> dict:
    """One task per node: join a gloo group through submitit's exported env and sum rank + 1."""
    import socket

    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export()
    dist.init_process_group(backend="gloo")  # env:// from MASTER_ADDR/PORT, RANK, WORLD_SIZE
    try:
        value = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(value)  # SUM
        info = {"rank": env.rank, "world_size": env.world_size, "node": os.environ["SLURMD_NODENAME"],
                "hostname": socket.gethostname(), "master": f"{env.master_addr}:{env.master_port}",
                "sum": value.item()}
    finally:
        dist.destroy_process_group()
    print(f"BT-GLOO {info}", flush=True)
    return info


def test_submitit_two_node_gloo_all_reduce(slurm_cluster: slurm.Cluster, tmp_path: Path) -> None:
    ex = _executor(tmp_path / "submitit", slurm_cluster, nodes=2, tasks_per_node=1, name="bt-gloo")
    job = ex.submit(_gloo_all_reduce)
    state = _wait_done(job, slurm_cluster, timeout=120)
    assert state == "COMPLETED", f"{state}\n{explain(job, slurm_cluster)}"
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in results), results  # (0+1) + (1+1)
    assert {r["node"] for r in results} == {"n1", "n2"}, results
    assert all(r["master"].startswith("n1:") for r in results), results
    outputs = "".join(job.task(i).stdout() or "" for i in range(2))
    assert "'node': 'n1'" in outputs and "'node': 'n2'" in outputs, outputs
    assert slurm_cluster.sacct_states(job.job_id) == ["COMPLETED"]


# ----------------------------------------------------------------------------- (c)


class StepCounter(submitit.helpers.Checkpointable):
    """Counts steps to a file, one line "STEP RESTART_COUNT" each; the file is the checkpoint."""

    def __call__(self, log: str, total: int, step_s: float) -> int:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        step = _lines(log)  # resume where the last run stopped
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while step < total:
                os.write(fd, f"{step} {restart}\n".encode())  # one syscall: a line is there or not
                step += 1
                time.sleep(step_s)
        finally:
            os.close(fd)
        return step

    def checkpoint(self, log: str, total: int, step_s: float) -> submitit.helpers.DelayedSubmission:
        print(f"checkpoint after {_lines(log)} steps", flush=True)
        return submitit.helpers.DelayedSubmission(StepCounter(), log, total, step_s)


def _lines(path: str) -> int:
    try:
        with open(path) as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def test_checkpointable_job_is_requeued_and_resumes(slurm_cluster: slurm.Cluster, tmp_path: Path) -> None:
    total, before_interrupt = 8, 4
    log = tmp_path / "steps.txt"
    # timeout_min=60: submitit calls a signal in the first min(80 %, timeout - 10 min) of the time
    # limit a preemption (with 5 it would count it as a timeout, of which it allows only 3)
    ex = _executor(tmp_path / "submitit", slurm_cluster, nodes=1, tasks_per_node=1, name="bt-requeue",
                   timeout_min=60)
    job = ex.submit(StepCounter(), str(log), total, 1.0)
    # preempt mid-way, and not within ~2 s of the start (SLURM then refuses the requeue)
    deadline = time.monotonic() + 60
    while _lines(str(log)) < before_interrupt:
        if time.monotonic() > deadline:
            pytest.fail(f"job never got to step {before_interrupt}\n{explain(job, slurm_cluster)}")
        time.sleep(0.2)
    job._interrupt()  # SIGTERM then USR2, as a preemption: submitit checkpoints and requeues
    state = _wait_done(job, slurm_cluster, timeout=90)
    assert state == "COMPLETED", f"{state}\n{explain(job, slurm_cluster)}"
    assert job.result() == total

    rows = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    steps, restarts = [r[0] for r in rows], [r[1] for r in rows]
    assert steps == list(range(total)), f"steps repeated or lost (a restart from 0?): {rows}"
    assert restarts == sorted(restarts) and set(restarts) == {0, 1}, rows
    first_resumed = steps[restarts.index(1)]
    assert first_resumed >= before_interrupt, f"resumed at step {first_resumed}: {rows}"
    states = slurm_cluster.sacct_states(job.job_id)
    assert states[-1] == "COMPLETED" and "REQUEUED" in states[:-1], states
    assert "this job is preempted" in (job.stderr() or ""), explain(job, slurm_cluster)
