"""Stage functions for tests on the SLURM cluster, run inside jobs as barlow runs its stages:
``barlow.launch.StageJob(tests.cluster.jobs.<name>)`` (the job's interpreter imports this
module by name, so the submitting environment's PYTHONPATH must hold the repository root).

StageJob calls ``barlow.distributed.setup()`` first (and passes its ``env``), so what these report
is what a stage of the pipeline would see. Each returns a JSON string (StageJob returns ``str``).
"""
from __future__ import annotations

import json
import os
import subprocess
import time


def world(env=None) -> str:
    """Rank and world as barlow's setup() made them, and a gloo all_reduce of 1 (the world's size
    if every task joined one process group; 1 if each task is alone)."""
    import torch
    import torch.distributed as dist

    value = torch.ones(1)
    joined = dist.is_available() and dist.is_initialized()
    if joined:
        dist.all_reduce(value)  # SUM
    info = {"rank": env.rank, "world": env.world, "local_rank": env.local_rank, "sum": value.item(),
            "group": dist.get_world_size() if joined else None, "procid": int(os.environ["SLURM_PROCID"]),
            "node": os.environ.get("SLURMD_NODENAME"),
            "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"}
    print(f"BT-WORLD {json.dumps(info)}", flush=True)
    return json.dumps(info)


def cpus(env=None) -> str:
    """The CPUs this task got, as SLURM reports them to the task and as barlow uses them."""
    import torch

    step = f"{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}"
    shown = subprocess.run(["scontrol", "show", "step", step], capture_output=True, text=True, timeout=30).stdout
    step_cpus = next((tok.split("=", 1)[1] for tok in shown.split() if tok.startswith("CPUs=")), None)
    info = {"affinity": len(os.sched_getaffinity(0)), "SLURM_CPUS_PER_TASK": os.environ.get("SLURM_CPUS_PER_TASK"),
            "SRUN_CPUS_PER_TASK": os.environ.get("SRUN_CPUS_PER_TASK"), "torch_threads": torch.get_num_threads(),
            "step_cpus": step_cpus, "node": os.environ.get("SLURMD_NODENAME"),
            # set by launcher.env / launcher.setup lines of the job script (tests/slurm/test_launch_slurm.py)
            "BT_ENV": os.environ.get("BT_ENV"), "BT_SETUP": os.environ.get("BT_SETUP")}
    print(f"BT-CPUS {json.dumps(info)}", flush=True)
    return json.dumps(info)


def rank1_fails(env=None, work_s: float = 120.0) -> str:
    """Rank 1 raises at once; rank 0 works on for ``work_s`` (a rank busy computing, or stuck in an
    NCCL collective that never returns; a gloo collective would notice the dead peer by itself, so
    rank 0 only sleeps). Only srun's --kill-on-bad-exit ends rank 0 early."""
    import torch.distributed as dist

    dist.barrier()  # both ranks are up (a rank that fails during the other's connect fails both at once)
    if env.rank == 1:
        raise RuntimeError("BT-RANK1 fails on purpose")
    print("BT-RANK0 working", flush=True)
    time.sleep(work_s)
    print("BT-RANK0 finished its work", flush=True)
    return json.dumps({"rank": env.rank})
