"""Process-group set-up from the environment: one process per device.

Under submitit (SLURM or its local executor) ``TorchDistributedEnvironment().export()`` fills
MASTER_ADDR/PORT, RANK, WORLD_SIZE and LOCAL_RANK; a plain ``python -m barlow`` run is rank 0 of 1.
Backend: nccl on GPU, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(prefer_gpu: bool = True) -> Env:
    if "SUBMITIT_EXECUTOR" in os.environ or "SLURM_JOB_ID" in os.environ and "SUBMITIT_FOLDER" in os.environ:
        try:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        except RuntimeError:
            pass  # not inside a submitit job after all
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = prefer_gpu and torch.cuda.is_available()
    device = f"cuda:{local}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    return Env(rank, world, local, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
