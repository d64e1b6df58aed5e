"""Compute estimate of an experiment before submitting it: FLOPs, optimizer steps, GPU-hours and
wall-clock hours per stage (``python -m barlow estimate --preset imagenet_r50_ep300``).

Usage::

    from barlow.config import resolve
    from barlow.estimate import estimate
    from barlow.estimate_report import print_estimate

    rows = estimate(resolve("imagenet_r50_ep300"), gpu_tflops=150.0, gpus=8)
    print_estimate(resolve("imagenet_r50_ep300"))
    # page cache from the dataset's converted files, else a measured sample of its images
    from barlow.beton_size import for_workflow_dataset
    print_estimate(resolve("imagenet_r50_ep300"), beton=for_workflow_dataset("imagenet", "config.yaml"))

The job's modules: this one the compute and time model (``estimate``, one row per stage) and the
monitor's share; ``barlow.estimate_costs`` the datasets' sizes and the model's FLOPs and bytes (meta
device); ``barlow.estimate_memory`` the memory model; ``barlow.estimate_report`` the printed tables
(``print_estimate``); ``barlow.monitor_schedule`` the monitor's evaluation rule, shared with the trainer.

Assumptions (each one is a number you can change by an argument, here or in barlow/estimate_memory.py):

* Images. ImageNet-1k presets (``data.image_size`` >= 64, or a description naming ImageNet):
  1,281,167 train / 50,000 val, 1000 classes; Fashion-MNIST presets (32 px): 60,000 / 10,000,
  10 classes. ``images`` / ``val_images`` override the counts; ``limit_train`` caps them as the
  trainer does.
* FLOPs. 1 FLOP = one multiply or one add (a multiply-accumulate is 2), the unit of a GPU's
  TFLOP/s. The backbone's forward FLOPs are counted on the real torchvision model at the preset's
  image size by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (convolutions and
  matmuls only; BN, ReLU, pooling and the optimizer are ignored, as is customary: a few %). For
  ResNet-50 at 224 px that is 8.17 GFLOP = 4.09 GMAC, the "4.1 GFLOPs" quoted in papers. The
  projector is counted the same way.
* Pretraining: per image, 2 views x 3 (forward + backward ~ 2 x forward) x (backbone + projector),
  plus the loss's cross-correlation bn(z1)^T bn(z2): 2 D^2 per sample forward, x3. Samples =
  optimizer steps x global batch; steps = ceil(epochs x (images // batch)) (the loader drops the
  last partial batch), capped by ``max_steps``. Accumulation changes neither.
* Probes (``probe.passes``): the backbone is frozen, so forward only (x1). A cached pass runs it
  once over train + val; any other pass once per epoch of its longest-lived head plus once over
  val. Heads: Linear(dims -> classes), forward + backward (x3) for each epoch they are active.
* Throughput: ``gpu_tflops`` sustained per GPU for mixed precision (amp_fp16 / amp_bf16).
  Stages that run in fp32 (the probes: barlow.probe uses no autocast; an fp32 pretrain) get half
  of it, as cuDNN runs fp32 convolutions as TF32 on A100/H100 (half the fp16 tensor-core rate).
* Wall-clock = GPU-hours / ``gpus`` (perfect scaling; data loading keeps up; no evaluation,
  checkpointing or queueing time).
* Conversion to FFCV (CPU only): ``CONVERT_RATE`` images/s per core, train + val. ImageNet:
  100 images/s/core = PIL-decode a ~500x375 JPEG (~4 ms), resize to max side 500 when larger,
  re-encode half of them at quality 90 (``proportion``, ~3 ms) plus FFCV's per-sample overhead.
  Fashion-MNIST: 5,000 images/s/core (raw 32 px arrays; the per-sample overhead dominates).
  Wall-clock on ``cpu_cores`` cores.

* Probe wall-clock: the probe is data-parallel over the tasks of its own job (``launcher.probe``
  nodes x tasks_per_node = ``probe_gpus``, default ``gpus``): GPU-hours are the total work,
  wall-clock = GPU-hours / ``probe_gpus``.

Memory (``memory`` columns; GB here means GiB, 2^30 bytes, as SLURM counts ``--mem=<N>G``):

* GPU, per task (one task per GPU): parameters + gradients + optimizer state (pretrain: fp32
  weights, grads and LARS momentum = 12 bytes per parameter, plus the 2-byte fp16 weight copies
  autocast caches; probe heads the same with SGD momentum; the frozen probe backbone: weights only)
  + activations at the per-GPU batch. Training activations are counted on the meta device: the
  bytes of every tensor autograd saves for the backward pass (fp32; x0.5 under amp_fp16/bf16),
  per image, from the difference between batches 4 and 2 (so weights saved by convolutions are not
  counted); a tensor saved by two ops (an in-place ReLU's output is also the next convolution's
  input) counts twice, so this is an upper bound (~1.5x). Barlow Twins: 2 views per image, plus the
  D x D cross-correlation and its gradient (4 D^2 x 4 bytes). Frozen-backbone inference (probe):
  2 x the largest input + output of any layer, per image. Plus ``CUDA_RESERVE_GB`` for the CUDA
  context, cuDNN workspaces and the caching allocator's slack. Rough (+-30 %): check with
  ``torch.cuda.max_memory_allocated``.
* Host, per node = tasks per node x per task: ``PROCESS_GB`` (Python, torch, the CUDA context's
  host side, FFCV's threads) + FFCV's batch buffers ((3 ahead + 2) x per-task batch x views x
  uint8 image) + pretrain (``pretrain_memory_gb``): the monitor's loader buffers, FFCV's per-image
  tables in each of its loaders (training + the monitor's bank and queries: ``FFCV_TABLE_BYTES``),
  and the checkpoint being written or read (fp32 weights + optimizer state: 8 bytes per parameter
  under LARS/SGD, 12 under AdamW); cached probe passes: this task's share of the cached features,
  stored as float16: images x sum of the pass's head dims x 2 bytes (train + val), split over the
  probe's tasks. Passes run one after another; the largest counts.
* Page cache: FFCV memory-maps the .beton (``os_cache=True``); the kernel keeps what was read in
  the page cache, one copy per node. It is reclaimable, but cgroups (SLURM's ``--mem``) count it
  against the job. FFCV 1.0.x refuses QUASI_RANDOM with ``distributed=True``, so pretraining reads in
  RANDOM order the whole file every epoch: a node whose job memory cannot hold it re-reads it from
  shared storage every epoch (``page_cache_shortfall`` says so in one line). Sizes come from
  ``barlow.beton_size``: the converted file's size on disk; before converting, a measured sample (a
  few hundred of the dataset's images converted with its own settings, extrapolated); where the
  images are not on this machine, FFCV's published ImageNet sizes for the dataset's settings,
  labelled "assumed, not measured" (the README's ImageNet settings, proportion p 0.5 at quality 90:
  0.5 x 65.47 + 0.5 x 616.18 = 340.8 GB for the train split).
* CPUs per task: the loader's decode threads (``pretrain.workers`` / ``probe.workers``) + 1 for
  the training loop; ``launcher.<stage>.cpus_per_task`` should be at least that.

Monitor (``pretrain.monitor``, barlow/monitor.py): an evaluation every ``every_steps`` optimizer steps
and at the last step (at epoch ends too with ``at_epoch_end``); each extracts the bank + query images
once, forward at ``data.image_size``, sharded over the pretraining tasks, then kNN on rank 0's device
(2 x bank x queries x dim FLOPs). Its share of pretraining = its FLOPs per GPU / pretraining's FLOPs
per GPU (same precision, same GPUs). If the loader, not the GPU, is the limit: an evaluation image
costs at most what a training image does (the same .beton and decode, one view instead of two, no
backward), so the share is at most evaluation images / training images. The online linear head
(rank 0 only): forward + backward of Linear(dim -> classes) on each step's first micro-batch.

Sanity check against the reference: the official Barlow Twins run (1000 epochs, batch 2048,
32 V100s for ~124 h) cost ~2.7k-4k V100-hours. This model gives 6.6e19 FLOP for 1000 epochs,
i.e. 305-610 V100-hours at 30-60 sustained TFLOP/s: 4.4-13x less. In other words the official
run sustained only ~4.6-6.8 TFLOP/s per V100 (PIL augmentation on the CPU, 64 images per GPU,
SyncBN and an 8192^2 cross-correlation all-reduced every step). The FLOP estimate is the
compute-bound floor; for a realistic budget pass the TFLOP/s your GPUs actually sustain on this
pipeline (the pretraining log prints img/s; TFLOP/s = img/s x pretrain GFLOP/image in the table).
"""
from __future__ import annotations

import math

from barlow import monitor_schedule
from barlow.config import complete
from barlow.estimate_costs import DATASETS, costs_of, dataset_of, image_counts
from barlow.estimate_finetune import finetune_rows
from barlow.estimate_memory import (micro_batch, page_cache_sizes, pretrain_gpu_gb, pretrain_memory_gb,
                                    probe_gpu_gb, probe_memory_gb)

FP32_RATIO = 0.5  # fp32 (TF32 convolutions) throughput relative to mixed precision
HEADS5 = ["feature1", "feature2", "feature3", "feature4", "feature5"]


def monitor_evaluations(total_steps: int, steps_per_epoch: int, every_steps: int, at_epoch_end: bool = False) -> int:
    """How many optimizer steps of 1..total_steps the monitor evaluates after (barlow.monitor.Monitor.due):
    multiples of every_steps, the last step, and with at_epoch_end the multiples of steps_per_epoch."""
    return monitor_schedule.evaluations(total_steps, monitor_schedule.periods(every_steps, steps_per_epoch,
                                                                              at_epoch_end))


def pretrain_flops_per_image(cfg: dict) -> float:
    """Pretraining FLOPs per image: 2 views x (forward + backward) of backbone + projector, and the loss's
    cross-correlation (2 D^2 forward, x3)."""
    costs = costs_of(cfg)
    d = cfg["model"]["projector"][-1]
    return 2 * 3 * (costs["backbone"] + costs["projector"]) + 3 * 2 * d * d


def monitor_cost(cfg: dict, train_images: int, steps: int, world: int, classes: int) -> dict:
    """The monitor's share of pretraining (see the module docstring): evaluations, images per
    evaluation, FLOPs per GPU (extraction sharded over ``world`` tasks + rank 0's kNN), ``share`` of the
    pretraining FLOPs per GPU, ``loader_share`` (its bound when loading limits), and the online linear
    head's FLOPs per step and share."""
    from barlow.monitor import subsets

    cfg = complete(cfg)
    p = cfg["pretrain"]
    mon = p["monitor"]
    costs = costs_of(cfg)
    dim = costs["dims"]["avgpool"]
    n = min(train_images, p["limit_train"]) if p["limit_train"] else train_images
    bs = p["batch_size"]
    train_per_gpu = steps * bs * pretrain_flops_per_image(cfg) / world
    bank, queries = (len(x) for x in subsets(n, mon["bank"], mon["queries"])) if n else (0, 0)
    evals = monitor_evaluations(steps, max(1, n // bs), mon["every_steps"], mon["at_epoch_end"]) \
        if mon["enabled"] else 0
    extract = evals * (bank + queries) * costs["backbone"] / world
    knn = evals * 2.0 * bank * queries * dim
    head_step = 3 * 2.0 * dim * classes * micro_batch(p, world) if mon["enabled"] else 0.0
    step_per_gpu = train_per_gpu / max(1, steps)
    return {"evaluations": evals, "bank": bank, "queries": queries, "dim": dim,
            "flops_per_gpu": extract + knn, "share": (extract + knn) / train_per_gpu if train_per_gpu else 0.0,
            "loader_share": evals * (bank + queries) / (steps * bs) if steps else 0.0,
            "head_flops_per_step": head_step, "head_share": head_step / step_per_gpu if step_per_gpu else 0.0}


def measured_counts(beton: dict, images: int | None, val_images: int | None) -> tuple[int | None, int | None]:
    """The image counts of measured .beton sizes, where no count was given."""
    return (images if images is not None or "train" not in beton else beton["train"].images,
            val_images if val_images is not None or "val" not in beton else beton["val"].images)


def _throughput(gpu_tflops: float, fp32: bool) -> float:
    return gpu_tflops * 1e12 * (FP32_RATIO if fp32 else 1.0)


def estimate(cfg: dict, images: int | None = None, gpu_tflops: float = 150.0, gpus: int = 8, *,
             val_images: int | None = None, cpu_cores: int = 16, probe_gpus: int | None = None,
             gpus_per_node: int = 8, beton: dict | None = None, finetune: bool | None = None) -> list[dict]:
    """One dict per stage: convert, pretrain, probe:<pass>, finetune:<p>% (and a total).

    Keys: stage, images (train images the stage reads per epoch), epochs, steps (optimizer steps;
    for probes: batches of the pass), flops, gflop_per_image (FLOPs per train image per epoch),
    gpu_hours, wall_hours, cpu_hours, note; memory: gpu_gb (per GPU), host_gb (per node, without
    page cache), cache_gb (page cache of the .beton files per node), cpus (per task), tasks_per_node;
    pretrain also: mem_gb (host + page cache per node, what to ask for), monitor (``monitor_cost``).
    ``gpus``: pretraining tasks (one per GPU); ``probe_gpus``: the probe's (default ``gpus``);
    ``gpus_per_node``: tasks per node of either; ``beton``: {"train", "val": barlow.beton_size.BetonSize},
    measured (``beton_size.for_dataset``): their image counts replace the dataset's known ones unless
    ``images`` / ``val_images`` are given; without, the documented fallback sizes (assumed).
    ``finetune``: add the fine-tunes of ``finetune.fractions`` (barlow.estimate_finetune); None: where ``cfg`` has a
    finetune section. See the module docstring for the assumptions.
    """
    if finetune or (finetune is None and "finetune" in cfg):
        cfg = {**cfg, "finetune": cfg.get("finetune") or {}}  # (completed below: the recipe's defaults)
    cfg = complete(cfg)
    probe_gpus = gpus if probe_gpus is None else probe_gpus
    if gpu_tflops <= 0 or gpus < 1 or cpu_cores < 1 or probe_gpus < 1 or gpus_per_node < 1:
        raise ValueError("gpu_tflops must be > 0, gpus, probe_gpus, gpus_per_node and cpu_cores >= 1")
    beton = beton or {}
    n_train, n_val = image_counts(cfg, *measured_counts(beton, images, val_images))
    classes, convert_rate = DATASETS[dataset_of(cfg)][2:]
    sizes = page_cache_sizes(cfg, n_train, n_val, beton)
    rows = [_convert_row(n_train + n_val, convert_rate, cpu_cores),
            _pretrain_row(cfg, n_train, classes, gpu_tflops, gpus, gpus_per_node, sizes["train"])]
    for pcfg in (cfg.get("probe") or {}).get("passes", []):
        rows.append(_probe_row(cfg, pcfg, (n_train, n_val), classes, gpu_tflops, probe_gpus, gpus_per_node,
                               sizes["train"].gb + sizes["val"].gb))
    if "finetune" in cfg:
        rows += finetune_rows(cfg, (n_train, n_val), classes, _throughput(gpu_tflops, True), probe_gpus, gpus_per_node)
    rows.append({"stage": "total", "images": None, "epochs": None, "steps": None, "flops": sum(r["flops"] for r in rows),
                 "gflop_per_image": None, "gpu_hours": sum(r["gpu_hours"] for r in rows),
                 "wall_hours": sum(r["wall_hours"] for r in rows), "cpu_hours": sum(r["cpu_hours"] for r in rows),
                 "gpu_gb": None, "host_gb": None, "cache_gb": None, "cpus": None, "tasks_per_node": None,
                 "note": "stages run one after another"})
    return rows


def _convert_row(images: int, convert_rate: float, cpu_cores: int) -> dict:
    cpu_h = images / convert_rate / 3600
    return {"stage": "convert", "images": images, "epochs": None, "steps": None, "flops": 0.0,
            "gflop_per_image": 0.0, "gpu_hours": 0.0, "wall_hours": cpu_h / cpu_cores, "cpu_hours": cpu_h,
            "gpu_gb": 0.0, "host_gb": None, "cache_gb": None, "cpus": cpu_cores, "tasks_per_node": 1,
            "note": f"{convert_rate:g} images/s/core, {cpu_cores} cores"}


def pretrain_steps(p: dict, images: int) -> int:
    """Optimizer steps of pretraining on ``images`` (after limit_train): ceil(epochs x (images // batch)),
    the loader dropping the last partial batch, capped by max_steps; 0 without pretraining."""
    if p["init"] in ("random", "checkpoint") or p["epochs"] <= 0:
        return 0
    steps = max(1, math.ceil(p["epochs"] * (images // p["batch_size"])))
    return min(steps, p["max_steps"]) if p["max_steps"] else steps


def _pretrain_row(cfg: dict, n_train: int, classes: int, gpu_tflops: float, gpus: int, gpus_per_node: int,
                  beton) -> dict:
    """Pretraining's row (none for pretrain.init: checkpoint: the probes read a released file)."""
    p = cfg["pretrain"]
    if p["init"] == "checkpoint":
        return {"stage": "pretrain", "images": 0, "epochs": None, "steps": 0, "flops": 0.0,
                "gflop_per_image": 0.0, "gpu_hours": 0.0, "wall_hours": 0.0, "cpu_hours": 0.0, "gpu_gb": 0.0,
                "host_gb": None, "cache_gb": None, "cpus": None, "tasks_per_node": None,
                "note": "none: pretrain.init checkpoint (the probes read the released weights)"}
    n = min(n_train, p["limit_train"]) if p["limit_train"] else n_train
    bs = p["batch_size"]
    steps = pretrain_steps(p, n)
    per_sample = pretrain_flops_per_image(cfg)
    flops = steps * bs * per_sample
    fp32 = p["precision"] == "fp32"
    gpu_h = flops / _throughput(gpu_tflops, fp32) / 3600
    mon = monitor_cost(cfg, n_train, steps, gpus, classes)
    tpn = min(gpus, gpus_per_node)
    nodes = math.ceil(gpus / tpn)
    return {"stage": "pretrain", "images": n, "epochs": p["epochs"], "steps": steps, "flops": flops,
            "gflop_per_image": per_sample / 1e9, "gpu_hours": gpu_h, "wall_hours": gpu_h / gpus,
            "cpu_hours": 0.0, "gpu_gb": pretrain_gpu_gb(cfg, gpus, mon),
            "host_gb": pretrain_memory_gb(cfg, n_train, nodes=nodes, tasks_per_node=tpn), "cache_gb": beton.gb,
            "mem_gb": pretrain_memory_gb(cfg, n_train, nodes=nodes, tasks_per_node=tpn, beton_bytes=beton.bytes),
            "monitor": mon, "cpus": p["workers"] + 1, "tasks_per_node": tpn,
            "note": f"{'fp32' if fp32 else p['precision']}, batch {bs} x accumulation "
            f"{p['accumulation']} ({micro_batch(p, gpus)}/GPU on {gpus} GPUs)"}


def _probe_row(cfg: dict, pcfg: dict, counts: tuple[int, int], classes: int, gpu_tflops: float, probe_gpus: int,
               gpus_per_node: int, cache_gb: float) -> dict:
    """The row of probe pass ``pcfg`` (``counts``: train and val images)."""
    n_train, n_val = counts
    pc = cfg["probe"]
    costs = costs_of(cfg)
    npr = min(n_train, pc["limit_train"]) if pc["limit_train"] else n_train
    pbs = pcfg["batch_size"]
    per_epoch = (npr // pbs) * pbs  # drop_last
    head_epochs = {h: pcfg.get("head_overrides", {}).get(h, {}).get("epochs", pcfg["epochs"]) for h in pcfg["heads"]}
    epochs = max(head_epochs.values())
    head_fwd = {h: 2.0 * costs["dims"][h] * classes for h in pcfg["heads"]}
    if pcfg["cached"]:
        backbone = costs["backbone"] * (npr + n_val)
    else:
        backbone = costs["backbone"] * (epochs * per_epoch + n_val)
    heads = sum(3 * head_fwd[h] * head_epochs[h] * per_epoch + head_fwd[h] * n_val for h in pcfg["heads"])
    flops = backbone + heads
    gpu_h = flops / _throughput(gpu_tflops, True) / 3600
    tpn = min(probe_gpus, gpus_per_node)
    nodes = math.ceil(probe_gpus / tpn)
    host = probe_memory_gb({**cfg, "probe": {**pc, "passes": [pcfg]}}, n_train, n_val, nodes=nodes,
                           tasks_per_node=tpn)
    return {"stage": f"probe:{pcfg['name']}", "images": npr, "epochs": epochs, "steps": epochs * (npr // pbs),
            "flops": flops, "gflop_per_image": flops / max(1, epochs * npr) / 1e9, "gpu_hours": gpu_h,
            "wall_hours": gpu_h / probe_gpus, "cpu_hours": 0.0, "gpu_gb": probe_gpu_gb(cfg, pcfg, probe_gpus, classes),
            "host_gb": host, "cache_gb": cache_gb, "cpus": pc["workers"] + 1, "tasks_per_node": tpn,
            "note": ("cached fp16 features, " if pcfg["cached"] else "frozen forward every epoch, ")
            + f"fp32, batch {pbs}, {len(pcfg['heads'])} head(s), on {probe_gpus} GPUs"}
