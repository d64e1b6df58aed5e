"""barlow.distributed: the job's own environment wins over stale variables; one GPU per task."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from barlow import distributed, lock
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
    # setup() writes the job's variables into os.environ itself (submitit's export), past monkeypatch:
    # a leaked WORLD_SIZE=8 made a later test's process group wait for 7 ranks that never come
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")) or key in STALE or key == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(key)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_slurm_task_environment_wins_over_stale_variables(clean_env):
    for k, v in {**SLURM_TASK, **STALE}.items():
        clean_env.setenv(k, v)
    groups = []
    clean_env.setattr(dist, "is_initialized", lambda: False)
    clean_env.setattr(dist, "init_process_group", lambda backend, rank, world_size, timeout: groups.append(
        (backend, rank, world_size, timeout.total_seconds())))
    env = distributed.setup(prefer_gpu=False)
    assert (env.rank, env.world, env.local_rank, env.main) == (5, 8, 1, False)
    # NCCL's own default (10 min) is shorter than rank 0's wait on a stale output lock (barlow.lock)
    assert groups == [("gloo", 5, 8, distributed.PG_TIMEOUT_MIN * 60)]
    from barlow.pretrain_claim import LOCK_WAIT_SHARE

    assert env.pg_timeout_s == distributed.PG_TIMEOUT_MIN * 60 == distributed.Env().pg_timeout_s
    assert LOCK_WAIT_SHARE * env.pg_timeout_s > lock.STALE_S  # a stale lock is taken over within the wait
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


def test_backend_and_timeout_from_the_environment(clean_env):
    """Two tasks sharing one GPU need gloo (NCCL refuses two ranks on one device): BARLOW_DIST_BACKEND."""
    for k, v in {**SLURM_TASK, "BARLOW_DIST_BACKEND": "gloo", "BARLOW_PG_TIMEOUT_MIN": "3"}.items():
        clean_env.setenv(k, v)
    groups = []
    clean_env.setattr(dist, "is_initialized", lambda: False)
    clean_env.setattr(dist, "init_process_group", lambda backend, rank, world_size, timeout: groups.append(
        (backend, timeout.total_seconds())))
    env = distributed.setup(prefer_gpu=False)
    assert groups == [("gloo", 180.0)] and env.pg_timeout_s == 180.0  # (rank 0's lock wait is a share of it)


# The layouts a cluster has, for every local rank of an 8-GPU node: the site binds one GPU per task
# (CUDA_VISIBLE_DEVICES=<k>), or every task sees all 8 and setup() narrows it, or the CUDA runtime
# started before narrowing and still sees all 8. The device and DDP's device_ids must name a GPU the
# task's runtime has, which is never the local rank in the first two (the crash of issue 22: probe
# heads wrapped with device_ids=[local_rank] on a narrowed task).
@pytest.mark.parametrize("local_rank", range(8))
@pytest.mark.parametrize("layout", ["bound", "all_visible", "runtime_started_early"])
def test_device_and_ddp_ids_for_every_layout(local_rank, layout):
    environ = {"CUDA_VISIBLE_DEVICES": str(local_rank) if layout == "bound" else "0,1,2,3,4,5,6,7"}
    if layout != "runtime_started_early":
        environ.update(gpu_binding(environ, local_rank, 8))
    visible = len(environ["CUDA_VISIBLE_DEVICES"].split(","))
    device = distributed.choose_device(local_rank, visible)
    index = 0 if layout != "runtime_started_early" else local_rank
    assert device == f"cuda:{index}"
    assert distributed.ddp_device_ids(device) == [index]
    assert 0 <= distributed.ddp_device_ids(device)[0] < visible


def test_cpu_and_missing_gpu_decisions():
    assert distributed.choose_device(3, 0) == "cpu"
    assert distributed.choose_device(3, 8, prefer_gpu=False) == "cpu"
    assert distributed.ddp_device_ids("cpu") is None
    with pytest.raises(BadInput, match="local rank 4: this task sees 2 GPUs"):
        distributed.choose_device(4, 2)


def test_wrap_is_the_module_itself_in_one_process():
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap(module, distributed.Env()) is module


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def test_no_other_module_builds_ddp_or_a_device_from_the_local_rank():
    """One function decides the device and one wraps in DDP; a second place is how the crash came in."""
    root = Path(__file__).resolve().parents[1]
    offences = []
    for path in sorted([*root.glob("barlow/**/*.py"), *root.glob("benchmarks/**/*.py")]):
        if path.name == "distributed.py" and path.parent.name == "barlow":
            continue
        tree = ast.parse(path.read_text())
        for call in _calls(tree):
            names = _names(call.func)
            used = set().union(*(_names(a) for a in [*call.args, *(k.value for k in call.keywords)])) if (
                call.args or call.keywords) else set()
            where = f"{path.relative_to(root)}:{call.lineno}"
            if "DistributedDataParallel" in names:
                offences.append(f"{where} builds DistributedDataParallel (use barlow.distributed.wrap)")
            device_call = names & {"device", "set_device", "barrier"} or any(k.arg == "device_ids" for k in call.keywords)
            if device_call and used & {"local_rank", "LOCAL_RANK", "SLURM_LOCALID"}:
                offences.append(f"{where} derives a device from the local rank (use env.device)")
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and "cuda:" in ast.unparse(node) and _names(node) & {
                    "local_rank", "LOCAL_RANK", "SLURM_LOCALID"}:
                offences.append(f"{path.relative_to(root)}:{node.lineno} formats a cuda device from the local rank")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("tf32, mode", [(False, "ieee"), (True, "tf32")])
def test_fp32_math_sets_matmuls_and_convolutions_together(tf32, mode):
    """PyTorch's own defaults: TF32 for cuDNN convolutions, IEEE for matmuls (issue 22: unchosen)."""
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        distributed.fp32_math(tf32)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (mode, mode)
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


class _DDPOfTorch211:
    """DistributedDataParallel.__init__'s parameters in torch 2.11 (the first GPU machine's torch), up to the
    buffer flag: no ``forward_sync_buffers`` yet, which is what crashed every multi-task stage there."""

    def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True, init_sync=True,
                 process_group=None, bucket_cap_mb=None, find_unused_parameters=False, check_reduction=False,
                 gradient_as_bucket_view=False, static_graph=False):
        pass


def test_the_buffer_flag_is_named_for_the_torch_that_runs():
    assert distributed.no_forward_buffer_sync(_DDPOfTorch211) == {"broadcast_buffers": False}
    assert distributed.no_forward_buffer_sync(torch.nn.parallel.DistributedDataParallel) == (
        {"forward_sync_buffers": False} if torch.__version__ >= "2.14" else {"broadcast_buffers": False})


def test_wrap_skips_the_buffer_broadcast_and_the_gradient_copy(monkeypatch):
    """Only rank 0's buffers are saved and it keeps its own; SyncBN/GlobalBatchNorm2d keep them equal anyway:
    DDP's per-forward broadcast of them is traffic for nothing (issue 22), as is a second copy of the gradients."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(__import__("tests.conftest", fromlist=["free_port"]).free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        net = distributed.wrap(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)),
                               distributed.Env(0, 2))  # (a world of one process, told it is rank 0 of 2)
        assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
        assert net.forward_sync_buffers is False and net.gradient_as_bucket_view is True
        assert net.device_ids is None  # a CPU module: no device ids at all
    finally:
        dist.destroy_process_group()
