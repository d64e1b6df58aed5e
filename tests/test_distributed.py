"""barlow.distributed: the job's own environment wins over stale variables; one GPU per task."""
from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from barlow import distributed
from barlow.distributed import gpu_binding
from barlow.errors import BadInput

# What srun sets for task 5 of an 8-task, 2-node job (4 tasks per node): the second task on node08.
SLURM_TASK = {
    "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[07-08]",
    "SLURMD_NODENAME": "node08",
}
# What sbatch handed on from the submitting shell (a torchrun / single-process session).
STALE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "elsewhere",
         "MASTER_PORT": "29500"}


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")) or key in STALE or key == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(key)
    return monkeypatch


def test_slurm_task_environment_wins_over_stale_variables(clean_env):
    for k, v in {**SLURM_TASK, **STALE}.items():
        clean_env.setenv(k, v)
    groups = []
    clean_env.setattr(dist, "is_initialized", lambda: False)
    clean_env.setattr(dist, "init_process_group", lambda backend, rank, world_size: groups.append(
        (backend, rank, world_size)))
    env = distributed.setup(prefer_gpu=False)
    assert (env.rank, env.world, env.local_rank, env.main) == (5, 8, 1, False)
    assert groups == [("gloo", 5, 8)]
    assert os.environ["MASTER_ADDR"] == "node07"  # the job's first node, not the stale one
    assert os.environ["LOCAL_WORLD_SIZE"] == "4"
    port = int(os.environ["MASTER_PORT"])  # derived from the job id: the same in every task
    assert 20000 <= port <= 60000 and port != 29500


def test_outside_a_job_the_environment_is_kept(clean_env):
    for k, v in {"RANK": "0", "WORLD_SIZE": "1"}.items():
        clean_env.setenv(k, v)
    assert distributed.job_kind(os.environ) is None
    env = distributed.setup(prefer_gpu=False)
    assert (env.rank, env.world, env.device) == (0, 1, "cpu")


def test_job_kind():
    assert distributed.job_kind(SLURM_TASK) == "slurm"
    assert distributed.job_kind({**SLURM_TASK, "SUBMITIT_EXECUTOR": ""}) is None
    no_srun = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_PROCID"}
    assert distributed.job_kind(no_srun) is None  # the batch script itself, not an srun task
    assert distributed.job_kind({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1"}) == "local"


@pytest.mark.parametrize("environ, local_rank, local_world, expected", [
    ({}, 0, 1, {}),  # one task, nothing set: every GPU visible, cuda:0
    ({}, 3, 4, {"CUDA_VISIBLE_DEVICES": "3"}),  # unset, four tasks per node
    ({"SLURM_GPUS_ON_NODE": "4"}, 3, 4, {"CUDA_VISIBLE_DEVICES": "3"}),
    ({"SLURM_GPUS_ON_NODE": "0"}, 1, 2, {}),  # a CPU job with two tasks per node
    ({"CUDA_VISIBLE_DEVICES": "2"}, 1, 4, {}),  # the site bound one GPU per task: keep it
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 2, 4, {"CUDA_VISIBLE_DEVICES": "2"}),  # all visible: take ours
    ({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 1, 4, {"CUDA_VISIBLE_DEVICES": "5"}),
    ({"CUDA_VISIBLE_DEVICES": "GPU-aa11,GPU-bb22"}, 1, 2, {"CUDA_VISIBLE_DEVICES": "GPU-bb22"}),
    ({"CUDA_VISIBLE_DEVICES": "MIG-aa11/1/0, MIG-cc33/2/0"}, 1, 2, {"CUDA_VISIBLE_DEVICES": "MIG-cc33/2/0"}),
    ({"CUDA_VISIBLE_DEVICES": "MIG-aa11"}, 0, 1, {}),
    ({"CUDA_VISIBLE_DEVICES": ""}, 1, 2, {}),  # no GPU for this job (submitit's local executor, 0 GPUs)
])
def test_gpu_binding(environ, local_rank, local_world, expected):
    assert gpu_binding(environ, local_rank, local_world) == expected


@pytest.mark.parametrize("environ", [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"SLURM_GPUS_ON_NODE": "2"}])
def test_more_tasks_than_gpus_is_one_line(environ):
    with pytest.raises(BadInput) as e:
        gpu_binding({**environ, "SLURMD_NODENAME": "node08"}, 3, 4)
    msg = str(e.value)
    assert "\n" not in msg and "tasks_per_node 4" in msg and "node08" in msg and "gpus_per_node" in msg
