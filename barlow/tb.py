"""TensorBoard scalars of a pretraining run, beside its metrics.csv (rank 0): live curves on a login node.

Optional: without the ``tensorboard`` package the stage runs as before and says so once. The event
files live in ``<run dir>/tb`` across resumes and requeues; a resumed run opens its writer with
``purge_step`` = the first step it recomputes, so TensorBoard drops what a killed predecessor wrote
after its last checkpoint and every step is read back once (tests/test_pretrain.py).
Watch: ``tensorboard --logdir results`` (every run's curves side by side).
"""
from __future__ import annotations

from pathlib import Path

_said = False


def writer(run_dir: Path, first_step: int):
    """A SummaryWriter for steps ``first_step + 1`` on, or None (no tensorboard: said once per process)."""
    global _said
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _said:
            print("note: tensorboard is not installed, so no live curves (pip install tensorboard); "
                  "metrics.csv has every value", flush=True)
            _said = True
        return None
    return SummaryWriter(str(Path(run_dir) / "tb"), purge_step=first_step + 1)


def write_step(w, step: int, loss: float, lrs: list[float], rate: float, watched: dict, gpu_gb: float | None) -> None:
    w.add_scalar("loss", loss, step)
    for i, lr in enumerate(lrs):
        w.add_scalar(f"lr/group{i}", lr, step)
    w.add_scalar("images_per_s", rate, step)
    for key in ("knn_k20", "knn_k200", "linear_top1"):
        if key in watched:
            w.add_scalar(f"monitor/{key}", watched[key], step)
    if gpu_gb is not None:
        w.add_scalar("gpu/max_memory_gb", gpu_gb, step)
