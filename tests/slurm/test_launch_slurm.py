"""barlow's launcher on the real cluster: what a stage's tasks see.

1. Submitted from a shell whose environment is stale (MASTER_ADDR/PORT, RANK=0, WORLD_SIZE=1,
   LOCAL_RANK=0 left over from an earlier run or an enclosing job: sbatch hands the submitting
   environment on to the job), a 2-task job still forms one world of 2 ranks (issue 15).
2. cpus_per_task reaches the tasks: the srun step is given it (SLURM 22.05 srun no longer
   inherits sbatch's), SRUN_CPUS_PER_TASK is exported, and the stage uses that many threads; so do
   launcher.setup lines and launcher.env variables (issue 22).
3. One rank fails: srun's --kill-on-bad-exit ends the other at once, and the error names that rank; a
   rank's own error (BadInput), which the job returns as a value, still ends the step at once and
   arrives as its one line.
4. A job over its QOS's MaxWall pends for ever (QOSMaxWallDurationPerJobLimit): the launcher cancels
   it and says so in one line (the cluster runs AccountingStorageEnforce=limits).

They submit barlow's own StageJob (a callable) through barlow.launch (the srun arguments and the setup
lines the pipeline uses) and run a function of tests/cluster/jobs.py in it.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import slurm
from tests.cluster.fixtures import explain
from tests.conftest import REPO

pytestmark = pytest.mark.slurm

STALE = {"MASTER_ADDR": "some-stale-host", "MASTER_PORT": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
         "LOCAL_WORLD_SIZE": "1"}


def _job_environment(monkeypatch) -> None:
    # the job imports tests.cluster.jobs (and barlow) through the environment sbatch passes on
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_", "BT_"))]:
        monkeypatch.delenv(key)  # pytest itself may run inside a job


def _submit(tmp_path: Path, monkeypatch, function: str, **launcher):
    """Submit StageJob(tests.cluster.jobs.<function>) as the pipeline submits a stage."""
    from barlow import launch
    from tests.cluster import jobs

    _job_environment(monkeypatch)
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
    job = _submit(tmp_path, monkeypatch, "cpus", nodes=1, tasks_per_node=1, cpus_per_task=2,
                  setup=["export BT_SETUP=from-setup"], env={"BT_ENV": "a b'c $HOME"})
    (info,) = _results(job, slurm_cluster, timeout=120)
    why = f"{info}\n{explain(job, slurm_cluster)}"
    script = job.paths.submission_file.read_text()
    srun = [line for line in script.splitlines() if line.lstrip().startswith("srun ")]
    assert len(srun) == 1 and "--cpus-per-task=2" in srun[0].split(), script
    assert "--kill-on-bad-exit=1" in srun[0].split(), script
    # launcher.setup and launcher.env reach the task, the value as given (quoted, not expanded)
    assert info["BT_SETUP"] == "from-setup" and info["BT_ENV"] == "a b'c $HOME", why
    # what SLURM reports to the task, and what the stage makes of it (torch's intra-op threads)
    assert info["SLURM_CPUS_PER_TASK"] == "2" and info["SRUN_CPUS_PER_TASK"] == "2", why
    assert info["step_cpus"] == "2" and info["torch_threads"] == 2, why
    # The cluster runs TaskPlugin=task/none (tests/cluster/slurm.py says why): nothing binds the
    # task to cores, so its affinity is the host's, not the step's; at least the 2 it was given.
    assert info["affinity"] >= 2, why


def _run_stage(tmp_path: Path, monkeypatch, fn, **launcher):
    """barlow.launch.run, the whole path a stage takes (submit, stream, wait, outcome)."""
    from barlow import launch

    _job_environment(monkeypatch)
    return launch.run(fn, {"executor": "slurm", "timeout_min": 60, "cpus_per_task": 1, "poll_s": 0.5, **launcher},
                      tmp_path / "stage", "bt-stage", stage="test")


def _job_id(tmp_path: Path) -> str:
    return json.loads((tmp_path / "stage" / "job.json").read_text())["job_id"]


@pytest.mark.timeout(240)  # without --kill-on-bad-exit: the 120 s of rank 0, then the assert says so
def test_a_failing_rank_ends_the_step_at_once(slurm_cluster, tmp_path, monkeypatch, capsys):
    from tests.cluster import jobs

    work_s = 120  # what rank 0 would run without --kill-on-bad-exit
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        _run_stage(tmp_path, monkeypatch, functools.partial(jobs.rank1_fails, work_s=work_s), nodes=1,
                   tasks_per_node=2)
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    why = f"{e.value}\n{out}\nsacct {slurm_cluster.sacct_states(_job_id(tmp_path))}\n{slurm_cluster.logs()}"
    assert "BT-RANK0 working" in out and "BT-RANK0 finished its work" not in out, why
    assert took < work_s - 30, f"{took:.0f} s: rank 0 ran on after rank 1 failed\n{why}"
    assert str(e.value).startswith(f"job {_job_id(tmp_path)} failed on rank 1 (RuntimeError: BT-RANK1 fails on "
                                   "purpose)"), why
    print(f"rank 1 failed, step ended, launcher returned: {took:.1f} s after submitting")


def _rank1_bad_input(env=None, work_s: float = 120.0) -> str:
    """As tests.cluster.jobs.rank1_fails, but rank 1 fails with the stage's own error (pickled by value:
    the job imports no test module)."""
    import torch.distributed as dist

    from barlow.errors import BadInput

    dist.barrier()
    if env.rank == 1:
        raise BadInput("data.path BT-RANK1.beton: bad on purpose; convert it first")
    print("BT-RANK0 working", flush=True)
    time.sleep(work_s)
    print("BT-RANK0 finished its work", flush=True)
    return "rank 0"


@pytest.mark.timeout(240)  # a task that returned its error but exited 0: the 120 s of rank 0
def test_a_ranks_own_error_ends_the_step_and_arrives_as_its_line(slurm_cluster, tmp_path, monkeypatch, capsys):
    import cloudpickle

    from barlow.errors import BadInput

    work_s = 120
    t0 = time.monotonic()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with pytest.raises(BadInput) as e:
            _run_stage(tmp_path, monkeypatch, functools.partial(_rank1_bad_input, work_s=work_s), nodes=1,
                       tasks_per_node=2)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    why = f"{e.value}\n{out}\nsacct {slurm_cluster.sacct_states(_job_id(tmp_path))}\n{slurm_cluster.logs()}"
    assert str(e.value) == "data.path BT-RANK1.beton: bad on purpose; convert it first", why
    assert "BT-RANK0 working" in out and "BT-RANK0 finished its work" not in out, why
    assert took < work_s - 30, f"{took:.0f} s: rank 0 ran on after rank 1 returned its error\n{why}"
    assert slurm_cluster.wait_job(_job_id(tmp_path), timeout=30) == "FAILED", why


@pytest.mark.timeout(180)  # a launcher that does not know this reason would wait for ever
def test_a_job_over_its_qos_max_wall_is_cancelled_with_one_line(slurm_cluster, tmp_path, monkeypatch):
    from barlow.errors import BadInput
    from tests.cluster import jobs

    qos = "bt_wall1"
    subprocess.run(["sacctmgr", "-i", "add", "qos", qos], capture_output=True, timeout=30)  # may exist already
    subprocess.run(["sacctmgr", "-i", "modify", "qos", qos, "set", "MaxWall=1"], capture_output=True, check=True,
                   timeout=30)
    try:
        with pytest.raises(BadInput) as e:
            _run_stage(tmp_path, monkeypatch, jobs.cpus, qos=qos, timeout_min=5)  # 5 min asked, 1 allowed
        job_id = _job_id(tmp_path)
        msg = str(e.value)
        why = f"{msg}\nsacct {slurm_cluster.sacct_states(job_id)}\n{slurm_cluster.logs()}"
        assert "\n" not in msg and msg.startswith(f"launcher.test: SLURM will never start job {job_id}: "
                                                  "QOSMaxWallDurationPerJobLimit, the QOS 'bt_wall1' limit MaxWall "
                                                  "per job"), why
        assert "lower launcher.test.timeout_min or ask for another qos" in msg, why
        assert slurm_cluster.wait_job(job_id, timeout=30) == "CANCELLED", why
    finally:
        if (tmp_path / "stage" / "job.json").is_file():
            subprocess.run(["scancel", _job_id(tmp_path)], capture_output=True, timeout=30)  # if it was not
        subprocess.run(["sacctmgr", "-i", "delete", "qos", qos], capture_output=True, timeout=30)
