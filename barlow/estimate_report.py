"""The printed report of ``barlow.estimate`` (``python -m barlow estimate``): the stages' compute and
time table, the memory table with its notes, and the monitor's share."""
from __future__ import annotations

import math

from barlow.config import complete
from barlow.estimate import FP32_RATIO, estimate, measured_counts
from barlow.estimate_costs import DATASET_NAMES, costs_of, dataset_of, image_counts
from barlow.estimate_memory import CUDA_RESERVE_GB, PROCESS_GB, page_cache_sizes

MEASURE_HINT = ("to measure the .beton sizes, name the dataset: python -m barlow estimate ... --dataset <name> (a "
                "datasets: entry of config.yaml: converts a few hundred of its images with its settings to a temporary "
                ".beton; once converted, the .beton's own size is used)")


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _num(v) -> str:
    """Readable at any magnitude: 19,684 / 36.5 / 0.0123 / 0."""
    if v is None:
        return "-"
    if v == 0 or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def _table(w, head: str) -> str:
    """A table's start: a blank line, the head and its rule (returned, for the total's)."""
    w()
    w(head)
    rule = "-" * len(head)
    w(rule)
    return rule


def print_estimate(cfg: dict, images: int | None = None, gpu_tflops: float = 150.0, gpus: int = 8, *,
                   val_images: int | None = None, cpu_cores: int = 16, probe_gpus: int | None = None,
                   gpus_per_node: int = 8, beton: dict | None = None, file=None, finetune: bool | None = None) -> list[dict]:
    """Print ``estimate(...)`` as a table (and return its rows)."""
    import sys

    out = file or sys.stdout
    cfg = complete(cfg)
    probe_gpus = gpus if probe_gpus is None else probe_gpus
    rows = estimate(cfg, images, gpu_tflops, gpus, val_images=val_images, cpu_cores=cpu_cores, probe_gpus=probe_gpus,
                    gpus_per_node=gpus_per_node, beton=beton, finetune=finetune)
    m = cfg["model"]
    size = cfg["data"]["image_size"]
    costs = costs_of(cfg)
    n_train, n_val = image_counts(cfg, *measured_counts(beton or {}, images, val_images))

    def w(s=""):
        print(s, file=out)

    w(f"estimate: {cfg.get('description', '(no description)')}")
    w(f"  data: {DATASET_NAMES[dataset_of(cfg)]}, {n_train:,} train / {n_val:,} val images")
    w(f"  model: {m['arch']} @ {size} px: {costs['backbone'] / 1e9:.3f} GFLOP forward/image "
      f"({costs['backbone'] / 2e9:.2f} GMAC), projector {m['projector']}: {costs['projector'] / 1e9:.3f} GFLOP")
    w(f"  GPUs: {gpus} x {gpu_tflops:g} TFLOP/s sustained (mixed precision; fp32 stages at {FP32_RATIO:g}x), "
      "perfect scaling")
    rule = _table(w, f"{'stage':<22} {'epochs':>7} {'steps':>10} {'PFLOP':>10} {'GFLOP/img':>10} {'GPU-h':>9} "
                     f"{'wall-h':>9} {'CPU-h':>8}  note")
    for r in rows:
        if r["stage"] == "total":
            w(rule)
        w(f"{r['stage']:<22} {_fmt(r['epochs'], 'g'):>7} {_fmt(r['steps'], ',d'):>10} {_num(r['flops'] / 1e15):>10} "
          f"{_num(r['gflop_per_image']):>10} {_num(r['gpu_hours']):>9} {_num(r['wall_hours']):>9} "
          f"{_num(r['cpu_hours']):>8}  {r['note']}")
    w()
    w(f"wall-h: pretrain on {gpus} GPUs, probes and fine-tunes on {probe_gpus} (data-parallel over their "
      f"launcher's nodes x tasks_per_node), convert on {cpu_cores} CPU cores. A FLOP estimate is the compute-bound "
      "floor: the official Barlow Twins run sustained ~5-7 TFLOP/s per V100 (2.7k-4k V100-h for 1000 epochs); "
      "pass --gpu-tflops what your GPUs sustain on this pipeline.")
    _print_memory(w, rows, page_cache_sizes(cfg, n_train, n_val, beton))
    pre = next(r for r in rows if r["stage"] == "pretrain")
    if pre.get("monitor"):
        _print_monitor(w, cfg, pre, gpus)
    return rows


def _print_memory(w, rows: list[dict], sizes: dict) -> None:
    """The memory table, what it counts, the .beton sizes and pretraining's mem_gb."""
    _table(w, f"{'memory (GB = GiB)':<22} {'tasks/node':>10} {'GPU GB/GPU':>11} {'host GB/node':>13} "
              f"{'page cache GB/node':>19} {'CPUs/task':>10}")
    for r in rows:
        if r["stage"] == "total":
            continue
        w(f"{r['stage']:<22} {_fmt(r['tasks_per_node'], 'd'):>10} {_num(r['gpu_gb']) if r['gpu_gb'] else '-':>11} "
          f"{_num(r['host_gb']):>13} {_num(r['cache_gb']):>19} {_fmt(r['cpus'], 'd'):>10}")
    w()
    w("GPU: weights + grads + optimizer state + activations at the per-GPU batch (autograd's saved tensors counted "
      f"on the meta device: an upper bound) + {CUDA_RESERVE_GB:g} GB CUDA/cuDNN reserve; rough, +-30 %. "
      f"Host: per task {PROCESS_GB:g} GB (Python, torch, CUDA, FFCV) + FFCV batch buffers + pretrain's checkpoint "
      "and monitor loader + cached probe features (float16, split over the probe's tasks). Page cache: the "
      "memory-mapped .beton, one copy per node: reclaimable, but SLURM's cgroup counts it against mem_gb "
      "(pretraining's mem_gb: host + page cache).")
    for split in ("train", "val"):
        b = sizes[split]
        w(f"  {split} .beton: {b.gb:,.2f} GiB ({b.bytes / 1e9:,.2f} GB), {b.images:,} images: {b.label()} ({b.detail})")
    if not all(b.measured for b in sizes.values()):
        w(f"  {MEASURE_HINT}")
    pre = next(r for r in rows if r["stage"] == "pretrain")
    if pre.get("mem_gb"):
        w(f"  pretrain: ask for mem_gb >= {math.ceil(pre['mem_gb'])} per node (host {_num(pre['host_gb'])} + the train "
          f".beton's page cache {_num(pre['cache_gb'])}: RANDOM order reads all of it every epoch; a node that cannot "
          "hold it re-reads it from storage each epoch)")


def _print_monitor(w, cfg: dict, pre: dict, gpus: int) -> None:
    mon, s = pre["monitor"], cfg["pretrain"]["monitor"]
    w()
    if not s["enabled"]:
        w("monitor: off (pretrain.monitor.enabled false)")
        return
    size = cfg["data"]["image_size"]
    fwd = costs_of(cfg)["backbone"]
    w(f"monitor: {mon['evaluations']:,} evaluations (every {s['every_steps']:,} of {pre['steps']:,} steps and the "
      f"last; epoch ends {'too' if s['at_epoch_end'] else 'no'}) x {mon['bank'] + mon['queries']:,} images (bank "
      f"{mon['bank']:,} + queries {mon['queries']:,}) x {fwd / 1e9:.2f} GFLOP forward at {size} px, "
      f"sharded over {gpus} GPUs, + kNN on rank 0: {100 * mon['share']:.2f} % of pretraining compute "
      f"(at most {100 * mon['loader_share']:.2f} % where the loader, not the GPU, is the limit)")
    w(f"  online linear head: {mon['head_flops_per_step'] / 1e9:.3g} GFLOP per step on rank 0 "
      f"({100 * mon['head_share']:.3f} % of a step: negligible)")
