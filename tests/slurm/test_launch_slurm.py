"""barlow's launcher on the real cluster: what a stage's tasks see.

1. Submitted from a shell whose environment is stale (MASTER_ADDR/PORT, RANK=0, WORLD_SIZE=1,
   LOCAL_RANK=0 left over from an earlier run or an enclosing job: sbatch hands the submitting
   environment on to the job), a 2-task job still forms one world of 2 ranks (issue 15).
2. cpus_per_task reaches the tasks: the srun step is given it (SLURM 22.05 srun no longer
   inherits sbatch's), SRUN_CPUS_PER_TASK is exported, and the stage uses that many threads.

Both submit barlow's own StageJob (a callable) through barlow.launch._executor (the srun arguments and the setup
lines the pipeline uses) and run a function of tests/cluster/jobs.py in it.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.cluster import slurm
from tests.cluster.fixtures import explain
from tests.conftest import REPO

pytestmark = pytest.mark.slurm

STALE = {"MASTER_ADDR": "some-stale-host", "MASTER_PORT": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
         "LOCAL_WORLD_SIZE": "1"}


def _submit(tmp_path: Path, monkeypatch, function: str, **launcher):
    """Submit StageJob(tests.cluster.jobs.<function>) as the pipeline submits a stage."""
    from barlow import launch
    from tests.cluster import jobs

    # the job imports tests.cluster.jobs (and barlow) through the environment sbatch passes on
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)  # pytest itself may run inside a job
    ex = launch._executor({"executor": "slurm", "timeout_min": 60, **launcher}, tmp_path / "submitit",
                          f"bt-{function}", "test")
    return ex.submit(launch.StageJob(getattr(jobs, function)))


def _results(job, cluster: slurm.Cluster, timeout: float) -> list[dict]:
    try:
        state = cluster.wait_job(job.job_id, timeout=timeout)
    except TimeoutError as exc:
        subprocess.run(["scancel", str(job.job_id)], check=False, timeout=30)
        pytest.fail(f"{exc}\n{explain(job, cluster)}")
    assert state == "COMPLETED", f"{state}\n{explain(job, cluster)}"
    return [json.loads(r) for r in job.results()]


@pytest.mark.parametrize("nodes, tasks_per_node", [(2, 1), (1, 2)], ids=["2-nodes-x-1", "1-node-x-2"])
def test_stale_submitting_environment_still_forms_one_world(slurm_cluster, tmp_path, monkeypatch, nodes,
                                                            tasks_per_node):
    for key, value in STALE.items():
        monkeypatch.setenv(key, value)
    job = _submit(tmp_path, monkeypatch, "world", nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=1)
    results = sorted(_results(job, slurm_cluster, timeout=120), key=lambda r: r["procid"])
    why = f"{results}\n{explain(job, slurm_cluster)}"
    # one world of 2: each task has its own rank, every all_reduce of 1 summed over both
    assert [(r["procid"], r["rank"], r["world"]) for r in results] == [(0, 0, 2), (1, 1, 2)], why
    assert all(r["group"] == 2 and r["sum"] == 2.0 for r in results), why
    assert [r["local_rank"] for r in results] == ([0, 0] if nodes == 2 else [0, 1]), why
    assert all(r["master"].startswith("n1:") and r["master"] != "n1:1" for r in results), why
    assert {r["node"] for r in results} == ({"n1", "n2"} if nodes == 2 else {"n1"}), why


def test_cpus_per_task_reach_the_step_and_the_stage(slurm_cluster, tmp_path, monkeypatch):
    job = _submit(tmp_path, monkeypatch, "cpus", nodes=1, tasks_per_node=1, cpus_per_task=2)
    (info,) = _results(job, slurm_cluster, timeout=120)
    why = f"{info}\n{explain(job, slurm_cluster)}"
    script = job.paths.submission_file.read_text()
    srun = [line for line in script.splitlines() if line.lstrip().startswith("srun ")]
    assert len(srun) == 1 and "--cpus-per-task=2" in srun[0].split(), script
    # what SLURM reports to the task, and what the stage makes of it (torch's intra-op threads)
    assert info["SLURM_CPUS_PER_TASK"] == "2" and info["SRUN_CPUS_PER_TASK"] == "2", why
    assert info["step_cpus"] == "2" and info["torch_threads"] == 2, why
    # The cluster runs TaskPlugin=task/none (tests/cluster/slurm.py says why): nothing binds the
    # task to cores, so its affinity is the host's, not the step's; at least the 2 it was given.
    assert info["affinity"] >= 2, why
