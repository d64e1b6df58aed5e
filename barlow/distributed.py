"""Process-group set-up from the environment: one process per device.

Inside a submitit job (SLURM or its local executor) the job's own environment decides rank, world
and local rank (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST, or submitit's
SUBMITIT_LOCAL_*): MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE are
overwritten from it, since sbatch hands the submitting shell's variables on to the job and a stale
RANK=0 WORLD_SIZE=1 there would make every task train alone as rank 0. A plain ``python -m barlow``
run keeps what the environment says (torchrun's variables), else it is rank 0 of 1.

GPUs: each task sees exactly one, as ``cuda:0`` (``choose_device`` is the one decision of the device,
``wrap`` the one place that builds DistributedDataParallel: its ``device_ids`` come from the device,
never from the local rank). Before CUDA is initialised, CUDA_VISIBLE_DEVICES
is narrowed to this task's GPU (``gpu_binding``), so sites that bind one GPU per task and sites that
show every task all GPUs of the node behave alike, and threads that never call ``set_device`` (FFCV
copies batches on a CUDA stream from its own thread) cannot create a context on another task's GPU.
Backend: nccl on GPU, gloo on CPU.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from barlow.errors import BadInput


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    pg_timeout_s: float = 45.0 * 60  # the process group's (PG_TIMEOUT_MIN unless configured)

    @property
    def main(self) -> bool:
        return self.rank == 0


def job_kind(environ: Mapping[str, str]) -> str | None:
    """'slurm' inside a task of a submitit SLURM job (started by srun), 'local' inside a task of
    submitit's local executor, else None."""
    kind = environ.get("SUBMITIT_EXECUTOR")
    if kind == "slurm" and "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ:
        return "slurm"
    if kind == "local" and "SUBMITIT_LOCAL_GLOBALID" in environ:
        return "local"
    return None


def export_job_env() -> None:
    """Inside a submitit job: (over)write the torch.distributed variables from the job's own environment."""
    if job_kind(os.environ) is None:
        return
    import submitit

    # An inherited MASTER_PORT is as stale as the rest; submitit then derives the port from the job id.
    os.environ.pop("MASTER_PORT", None)
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def _entries(value: str) -> list[str]:
    return [e.strip() for e in value.split(",") if e.strip()]


def gpu_binding(environ: Mapping[str, str], local_rank: int, local_world: int) -> dict[str, str]:
    """The CUDA_VISIBLE_DEVICES update (``{}``: leave it) that leaves this task exactly one GPU, ``cuda:0``.

    - CUDA_VISIBLE_DEVICES lists one GPU (the site binds one per task): keep it;
    - it lists several (every task sees the node's GPUs): keep the entry at ``local_rank``
      (indices, ``GPU-<uuid>`` or ``MIG-<uuid>`` alike); more tasks on the node than entries: BadInput;
    - it is set but empty: no GPU for this task (a CPU run): keep it;
    - it is unset and the node runs several tasks: ``str(local_rank)`` (SLURM_GPUS_ON_NODE, where
      SLURM sets it, must be >= the tasks on the node, else BadInput); one task: keep (device 0).
    """
    local_world = max(1, int(local_world))
    current = environ.get("CUDA_VISIBLE_DEVICES")
    if current is not None:
        entries = _entries(current)
        if len(entries) <= 1:
            return {}
        if local_world > len(entries):
            raise BadInput(f"launcher tasks_per_node {local_world}: more tasks on node "
                           f"{environ.get('SLURMD_NODENAME', '?')} than GPUs visible to them (CUDA_VISIBLE_DEVICES="
                           f"{current}); set tasks_per_node = gpus_per_node (one task per GPU)")
        if not 0 <= local_rank < len(entries):
            raise BadInput(f"local rank {local_rank}: no such GPU in CUDA_VISIBLE_DEVICES={current}")
        return {"CUDA_VISIBLE_DEVICES": entries[local_rank]}
    if local_world == 1:
        return {}
    on_node = environ.get("SLURM_GPUS_ON_NODE", "")
    if on_node.isdigit():
        if int(on_node) == 0:
            return {}  # a CPU job: nothing to bind
        if local_world > int(on_node):
            raise BadInput(f"launcher tasks_per_node {local_world}: more tasks on node "
                           f"{environ.get('SLURMD_NODENAME', '?')} than its {on_node} GPU(s) for this job; "
                           "set tasks_per_node = gpus_per_node (one task per GPU)")
    return {"CUDA_VISIBLE_DEVICES": str(local_rank)}


# The process group's timeout for every collective and for the rendezvous: long enough for rank 0's
# bounded wait on a predecessor's output lock (``barlow.lock``: a stale fallback lock is taken over
# after STALE_S = 30 min) while the other ranks wait in their first collective. NCCL's default (10 min)
# would fail those ranks first, and the job would end FAILED instead of training.
PG_TIMEOUT_MIN = 45.0


def choose_device(local_rank: int, visible: int, prefer_gpu: bool = True) -> str:
    """The one decision of where a task computes, given the GPUs its CUDA runtime sees after narrowing.

    - no GPU wanted or none visible: ``cpu``;
    - one visible (narrowed by ``gpu_binding``, or a site that binds one GPU per task): ``cuda:0``,
      whatever the local rank (LOCAL_RANK 5 of a node with 8 GPUs is this task's ``cuda:0``);
    - several visible (the runtime started before narrowing, so it still sees the node's GPUs):
      ``cuda:<local_rank>``; a local rank with no GPU of its own: BadInput.
    """
    if not prefer_gpu or visible <= 0:
        return "cpu"
    if visible == 1:
        return "cuda:0"
    if not 0 <= local_rank < visible:
        raise BadInput(f"local rank {local_rank}: this task sees {visible} GPUs and none is its own; "
                       "set tasks_per_node = gpus_per_node (one task per GPU)")
    return f"cuda:{local_rank}"


def ddp_device_ids(device: str | torch.device) -> list[int] | None:
    """DistributedDataParallel's ``device_ids`` for a module on ``device``: its own index, never the local rank."""
    device = torch.device(device)
    return [device.index or 0] if device.type == "cuda" else None


def wrap(module: torch.nn.Module, env: Env, **kwargs) -> torch.nn.Module:
    """``module`` wrapped for data parallelism over ``env``'s ranks (itself in a one-process run): the only
    place that builds DistributedDataParallel (tests/test_distributed.py checks no other module does).

    ``forward_sync_buffers=False`` (torch 2.14's name for ``broadcast_buffers``: see ``no_forward_buffer_sync``;
    the buffers are still synced once, at construction): DDP would otherwise copy rank 0's buffers (BatchNorm running statistics) to every
    rank before each forward; only rank 0's are ever saved and rank 0 keeps its own either way, and with
    SyncBatchNorm (GPU pretraining) or GlobalBatchNorm2d (probes) every rank holds the same ones anyway.
    ``gradient_as_bucket_view``: gradients live in the all-reduce buckets (no second copy of them).
    """
    if env.world == 1:
        return module
    options = dict(device_ids=ddp_device_ids(env.device), gradient_as_bucket_view=True,
                   **no_forward_buffer_sync(torch.nn.parallel.DistributedDataParallel))
    return torch.nn.parallel.DistributedDataParallel(module, **{**options, **kwargs})


def no_forward_buffer_sync(ddp_class: type) -> dict:
    """The keyword that turns off DDP's buffer broadcast before each forward, in the torch that runs: 2.14
    renamed ``broadcast_buffers`` (deprecated there) to ``forward_sync_buffers``, which older torch rejects
    (``TypeError``: the first GPU run, on a machine with its own torch 2.11, crashed every multi-task stage).
    pyproject leaves torch unpinned, so a cluster's own torch is expected."""
    import inspect

    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters
            else "broadcast_buffers")
    return {name: False}


def _visible_gpus() -> int:
    """GPUs this process's CUDA runtime sees. torch.cuda.device_count() would read the *current*
    CUDA_VISIBLE_DEVICES through NVML, which says 1 after narrowing even when the runtime started earlier
    and still sees all of them; asking the runtime itself gives what ``cuda:<n>`` will mean."""
    if not torch.cuda.is_available():
        return 0
    return int(torch._C._cuda_getDeviceCount())


def setup(prefer_gpu: bool = True, backend: str | None = None, timeout_min: float | None = None) -> Env:
    """This task's Env; the process group when the world has several ranks.

    ``backend``: nccl on GPU, gloo on CPU unless given (or BARLOW_DIST_BACKEND: e.g. gloo for two
    tasks sharing one GPU, which NCCL refuses). ``timeout_min``: the process group's (or
    BARLOW_PG_TIMEOUT_MIN; default PG_TIMEOUT_MIN).
    """
    import datetime

    export_job_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or (world if world > 1 else 1)
    if prefer_gpu and not torch.cuda.is_initialized():  # narrowing only works before CUDA starts
        os.environ.update(gpu_binding(os.environ, local, local_world))
    device = choose_device(local, _visible_gpus() if prefer_gpu else 0, prefer_gpu)
    gpu = device != "cpu"
    if prefer_gpu and not gpu and int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0) > 0:
        raise BadInput(f"rank {rank}: SLURM gave this job {os.environ['SLURM_GPUS_ON_NODE']} GPU(s) on "
                       f"{os.environ.get('SLURMD_NODENAME', '?')} but CUDA sees none (CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); check the site's GPU binding")
    if gpu:
        torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    minutes = float(timeout_min or os.environ.get("BARLOW_PG_TIMEOUT_MIN") or PG_TIMEOUT_MIN)
    if world > 1 and not dist.is_initialized():
        backend = backend or os.environ.get("BARLOW_DIST_BACKEND") or ("nccl" if gpu else "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=minutes))
    return Env(rank, world, local, device, minutes * 60)


def fp32_math(tf32: bool) -> None:
    """TF32 or IEEE fp32 for CUDA matmuls *and* convolutions, chosen together (PyTorch's defaults differ:
    TF32 on for cuDNN convolutions, off for matmuls, an unnamed mix neither the V100 runs nor a TF32 run had)."""
    mode = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def gather_rows(x: torch.Tensor, n: int, env: Env, device) -> torch.Tensor:
    """The ``n`` rows of which rank r holds positions r, r + world, ... (a strided shard), in global order,
    on every rank. ``device``: where the collective runs (the compute device: nccl needs CUDA tensors)."""
    if env.world == 1:
        return x
    m = -(-n // env.world)  # the longest shard; shorter ones are padded to it
    padded = torch.zeros((m, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[:len(x)] = x.to(device)
    shards = [torch.empty_like(padded) for _ in range(env.world)]
    dist.all_gather(shards, padded)
    # row j of rank r is global position j * world + r; the padding rows land at positions >= n
    return torch.stack(shards, dim=1).flatten(0, 1)[:n]


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def use_task_cpus() -> None:
    """Use every core the scheduler gave this task for intra-op work (SLURM's cpus-per-task, else all)."""
    n = int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, n))
