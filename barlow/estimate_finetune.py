"""The semi-supervised fine-tune's share of ``barlow.estimate`` (one row per percent of ``finetune.fractions``).

Per epoch the backbone and the linear head (d -> C) train on the subset, forward + backward (x3), the last
partial batch dropped as barlow/finetune.py does, and evaluate on the whole val split (forward, x1) after the
epoch, as evaluate.py does:

    per_epoch = (n // bs) * bs
    flops = epochs * (3 * (F + 2 d C) * per_epoch + (F + 2 d C) * n_val)

``F``: the backbone's forward FLOPs per image (``estimate_costs``), ``n``: the subset's size (SimCLR's lists
for ImageNet at 1 and 10 %: their line counts, barlow/splits/; else ``round(n_train x p / 100)``, at least one
image a class, as ``finetune_subset.balanced_indices``). fp32 (no autocast): half the mixed-precision rate.
GPU memory: weights, grads and SGD momentum (12 bytes a parameter) + the training activations at the task's
share of the batch (pretraining's per-image count, one view: it includes the projector, so an upper bound) +
the CUDA reserve. Wall-clock: data-parallel over the probes' GPUs (``probe_gpus``), as launcher.finetune is.
"""
from __future__ import annotations

import math
from pathlib import Path

from barlow.estimate_costs import costs_of, dataset_of, memory_of
from barlow.estimate_memory import CUDA_RESERVE_GB, GIB, _loader_gb

SPLITS = Path(__file__).resolve().parent / "splits"


def subset_images(cfg: dict, percent: float, n_train: int, classes: int) -> int:
    """Train images of the fine-tune at ``percent`` (see the module docstring)."""
    listed = SPLITS / f"{percent:g}percent.txt"
    if dataset_of(cfg) == "imagenet" and cfg["finetune"]["subset"] in ("auto", "simclr") and listed.is_file():
        with listed.open() as f:
            return sum(1 for line in f if line.strip())
    return max(classes, int(round(n_train * percent / 100)))


def finetune_flops(forward: float, head: float, images: int, batch: int, epochs: int, val_images: int) -> float:
    """The formula of the module docstring: ``forward`` F, ``head`` 2 d C, ``images`` n."""
    per_epoch = (images // batch) * batch
    return epochs * (3 * (forward + head) * per_epoch + (forward + head) * val_images)


def finetune_rows(cfg: dict, counts: tuple[int, int], classes: int, throughput: float, gpus: int,
                  gpus_per_node: int) -> list[dict]:
    """One estimate row per fraction (``cfg`` completed with a finetune section; ``throughput`` the fp32
    FLOP/s of one GPU)."""
    ft, costs, mem = cfg["finetune"], costs_of(cfg), memory_of(cfg)
    n_train, n_val = counts
    head = 2.0 * costs["dims"]["avgpool"] * classes
    tpn = min(gpus, gpus_per_node)
    per_gpu = math.ceil(ft["batch_size"] / gpus)
    gpu_gb = (mem["backbone"] * 12 + per_gpu * mem["train_bytes"]) / GIB + CUDA_RESERVE_GB
    host = tpn * (4.0 + _loader_gb(per_gpu, cfg["data"]["image_size"], 1))  # as a probe task (PROCESS_GB + loader)
    rows = []
    for p in ft["fractions"]:
        n = subset_images(cfg, p, n_train, classes)
        flops = finetune_flops(costs["backbone"], head, n, ft["batch_size"], ft["epochs"], n_val)
        gpu_h = flops / throughput / 3600
        rows.append({"stage": f"finetune:{p:g}%", "images": n, "epochs": ft["epochs"],
                     "steps": ft["epochs"] * (n // ft["batch_size"]), "flops": flops,
                     "gflop_per_image": flops / max(1, ft["epochs"] * n) / 1e9, "gpu_hours": gpu_h,
                     "wall_hours": gpu_h / gpus, "cpu_hours": 0.0, "gpu_gb": gpu_gb, "host_gb": host,
                     "cache_gb": None, "cpus": ft["workers"] + 1, "tasks_per_node": tpn,
                     "note": f"fp32, batch {ft['batch_size']}, {n:,} labelled images, val every epoch, on {gpus} GPUs"})
    return rows
