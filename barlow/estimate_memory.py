"""The memory model of ``barlow.estimate``: GPU memory per task, host memory per node (the launcher's
``mem_gb``) and the page cache of the .beton files. Torch-free; the assumptions are in
barlow/estimate.py's docstring (GB here means GiB, 2^30 bytes, as SLURM counts ``--mem=<N>G``).
"""
from __future__ import annotations

import math

from barlow.config import complete
from barlow.estimate_costs import costs_of, dataset_of, memory_of, params_of

GIB = 2**30
PROCESS_GB = 4.0  # host memory of one task before data: Python, torch, CUDA context (host side), FFCV threads
CUDA_RESERVE_GB = 2.0  # per GPU: CUDA context, cuDNN workspaces, caching-allocator slack
BATCHES_AHEAD = 3  # FFCV Loader default; it keeps this many batches + 2 in flight
# FFCV's per-image tables in each Loader: metadata (RGB image 16 + int label 8 bytes, ffcv.types), its
# allocation entry (24), and the index array + one epoch's order (8 + 8); tests/test_estimate.py checks the 48
FFCV_TABLE_BYTES = 64
KNN_CHUNK = 1024  # barlow.knn's query chunk: one chunk x bank similarity matrix at a time


def cached_dims(cfg: dict, pcfg: dict) -> int:
    return sum(costs_of(cfg)["dims"][h] for h in pcfg["heads"])


def _loader_gb(batch_per_task: int, image_size: int, views: int) -> float:
    return (BATCHES_AHEAD + 2) * batch_per_task * views * 3 * image_size * image_size / GIB


def probe_memory_gb(cfg: dict, train_images: int, val_images: int, *, nodes: int = 1,
                    tasks_per_node: int = 1) -> float:
    """Host memory (GB = GiB) per node the probe stage needs: per task ``PROCESS_GB`` + FFCV's batch
    buffers + its share of the cached features (float16, train + val, split over nodes x tasks_per_node
    tasks) of the largest cached pass; page cache not included (see the module docstring)."""
    cfg = complete(cfg)
    pc = cfg.get("probe") or {}
    world = max(1, nodes * tasks_per_node)
    size = cfg["data"]["image_size"]
    n = min(train_images, pc["limit_train"]) if pc["limit_train"] else train_images
    per_task = PROCESS_GB
    worst = 0.0
    for pcfg in pc.get("passes", []):
        loader = _loader_gb(max(1, pcfg["batch_size"] // world), size, 1)
        feats = 0.0
        if pcfg["cached"]:
            feats = (math.ceil(n / world) + math.ceil(val_images / world)) * cached_dims(cfg, pcfg) * 2 / GIB
        worst = max(worst, loader + feats)
    return tasks_per_node * (per_task + worst)


def state_bytes(p: dict) -> int:
    """Optimizer state per parameter (fp32): LARS / SGD one momentum buffer, AdamW two moments."""
    return 8 if p["optimizer"] == "adamw" else 4


def micro_batch(p: dict, world: int) -> int:
    """Images a task runs through one forward: the global batch over tasks and accumulation."""
    return max(1, math.ceil(p["batch_size"] / (world * p["accumulation"])))


def pretrain_memory_gb(cfg: dict, train_images: int, *, nodes: int = 1, tasks_per_node: int = 1,
                       beton_bytes: int = 0) -> float:
    """Host memory (GB = GiB) per node pretraining needs, the launcher's ``mem_gb``: per task
    ``PROCESS_GB`` + the 2-view loader's batch buffers at the task's micro-batch + the monitor's loader
    buffers (when it is on) + FFCV's per-image tables in each loader + the checkpoint's host copy (fp32
    weights + optimizer state); per node, once for all its tasks, the train .beton's page cache
    (``beton_bytes``: its size on disk, ``barlow.beton_size``; 0 for the need without it). RANDOM order
    reads the whole file every epoch (FFCV 1.0.x refuses QUASI_RANDOM with distributed=True), so a job
    whose nodes cannot cache it re-reads it from storage every epoch."""
    cfg = complete(cfg)
    p = cfg["pretrain"]
    size = cfg["data"]["image_size"]
    world = max(1, nodes * tasks_per_node)
    n = min(train_images, p["limit_train"]) if p["limit_train"] else train_images
    params = sum(params_of(cfg).values())  # (torch-free: the launcher sizes the job with this)
    mon = p["monitor"]
    loaders = 3 if mon["enabled"] else 1  # training + the monitor's bank and query loaders
    per_task = (PROCESS_GB + _loader_gb(micro_batch(p, world), size, 2)
                + (_loader_gb(mon["batch_size"], size, 1) if mon["enabled"] else 0.0)  # one at a time
                + loaders * n * FFCV_TABLE_BYTES / GIB
                + params * (4 + state_bytes(p)) / GIB)
    return tasks_per_node * per_task + beton_bytes / GIB


def page_cache_shortfall(node_mem_gb: float, need_gb: float, beton_gb: float, stage: str = "pretrain") -> str | None:
    """The one line for a job whose nodes cannot keep the train .beton in their page cache (None if they
    can): ``node_mem_gb`` what a node of the job may hold (its ``mem_gb``, or the largest node's memory),
    ``need_gb`` ``pretrain_memory_gb`` with the file, ``beton_gb`` the file's size (GiB)."""
    if node_mem_gb >= need_gb:
        return None
    return (f"launcher.{stage}: the train .beton is {beton_gb:,.1f} GB and the job's nodes have {node_mem_gb:,.1f} GB: "
            "every epoch would re-read it from storage; stage it to node-local disk (e.g. copy to $TMPDIR in "
            f"launcher.{stage}.setup) or ask for mem_gb >= {math.ceil(need_gb)}")

def page_cache_sizes(cfg: dict, n_train: int, n_val: int, beton: dict | None = None) -> dict:
    """{"train": BetonSize, "val": BetonSize}: the measured ones given in ``beton``
    (barlow.beton_size.for_dataset), else the documented fallback, labelled assumed."""
    from barlow import beton_size

    out = dict(beton or {})
    for split, n in (("train", n_train), ("val", n_val)):
        if split not in out:
            out[split] = beton_size.assumed(dataset_of(cfg), split, n)
    return out



def pretrain_gpu_gb(cfg: dict, gpus: int, mon: dict) -> float:
    """GPU memory (GB) per pretraining task: weights, grads and optimizer state (+ the fp16 copies
    autocast caches), the activations at the task's micro-batch, the loss's D x D cross-correlation and
    its gradient, and the monitor's gathered features + one kNN chunk (``mon``: ``monitor_cost``)."""
    p = cfg["pretrain"]
    mem = memory_of(cfg)
    fp32 = p["precision"] == "fp32"
    d = cfg["model"]["projector"][-1]
    params = mem["backbone"] + mem["projector"]
    act = micro_batch(p, gpus) * 2 * mem["train_bytes"] * (1.0 if fp32 else 0.5)
    # the monitor's features, gathered on every rank (+ the stacking copy), and one kNN chunk on rank 0
    mon_gpu = (2 * (mon["bank"] + mon["queries"]) * mon["dim"] + KNN_CHUNK * mon["bank"]) * 4 \
        if p["monitor"]["enabled"] else 0
    state = 4 + 4 + state_bytes(p) + (0 if fp32 else 2)  # weights, grads, optimizer state (+ fp16 copies)
    return (params * state + act + 4 * d * d * 4 + mon_gpu) / GIB + CUDA_RESERVE_GB


def probe_gpu_gb(cfg: dict, pcfg: dict, probe_gpus: int, classes: int) -> float:
    """GPU memory (GB) per probe task of pass ``pcfg``: the frozen backbone's weights, the heads with SGD
    momentum, and the frozen forward + the heads' inputs at the task's share of the batch."""
    costs, mem = costs_of(cfg), memory_of(cfg)
    dims = cached_dims(cfg, pcfg)
    per_gpu = math.ceil(pcfg["batch_size"] / probe_gpus)
    head_params = sum((costs["dims"][h] + 1) * classes for h in pcfg["heads"])
    return (mem["backbone"] * 4 + head_params * 12 + per_gpu * (mem["infer_bytes"] + 3 * dims * 4)) / GIB \
        + CUDA_RESERVE_GB
