"""Compute estimate of an experiment before submitting it: FLOPs, optimizer steps, GPU-hours and
wall-clock hours per stage (``python -m barlow estimate --preset imagenet_r50_ep300``).

Usage::

    from barlow.config import resolve
    from barlow.estimate import estimate, print_estimate

    rows = estimate(resolve("imagenet_r50_ep300"), gpu_tflops=150.0, gpus=8)
    print_estimate(resolve("imagenet_r50_ep300"))
    # page cache from the dataset's converted files, else a measured sample of its images
    from barlow.beton_size import for_workflow_dataset
    print_estimate(resolve("imagenet_r50_ep300"), beton=for_workflow_dataset("imagenet", "config.yaml"))

Assumptions (each one is a number you can change by an argument or in this file):

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

import functools
import math

from barlow.config import complete

DATASETS = {
    # name: (train images, val images, classes, convert images/s/core)
    "imagenet": (1_281_167, 50_000, 1000, 100.0),
    "fmnist": (60_000, 10_000, 10, 5000.0),
    # CIFAR: raw 32 px arrays, as Fashion-MNIST. ImageNet-100 (the CMC list): 126,689 train / 5,000 val as
    # commonly reported for that list (not checked here: no ImageNet on this machine; --images overrides).
    "cifar10": (50_000, 10_000, 10, 5000.0),
    "cifar100": (50_000, 10_000, 100, 5000.0),
    "imagenet100": (126_689, 5_000, 100, 100.0),
}
DATASET_NAMES = {"imagenet": "ImageNet-1k", "fmnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
                 "imagenet100": "ImageNet-100"}
FP32_RATIO = 0.5  # fp32 (TF32 convolutions) throughput relative to mixed precision
GIB = 2**30
PROCESS_GB = 4.0  # host memory of one task before data: Python, torch, CUDA context (host side), FFCV threads
CUDA_RESERVE_GB = 2.0  # per GPU: CUDA context, cuDNN workspaces, caching-allocator slack
BATCHES_AHEAD = 3  # FFCV Loader default; it keeps this many batches + 2 in flight
# FFCV's per-image tables in each Loader: metadata (RGB image 16 + int label 8 bytes, ffcv.types), its
# allocation entry (24), and the index array + one epoch's order (8 + 8); tests/test_estimate.py checks the 48
FFCV_TABLE_BYTES = 64
KNN_CHUNK = 1024  # barlow.knn's query chunk: one chunk x bank similarity matrix at a time
MEASURE_HINT = ("to measure the .beton sizes, name the dataset: python -m barlow estimate ... --dataset <name> (a "
                "datasets: entry of config.yaml: converts a few hundred of its images with its settings to a temporary "
                ".beton; once converted, the .beton's own size is used)")
HEADS5 = ["feature1", "feature2", "feature3", "feature4", "feature5"]


def dataset_of(cfg: dict) -> str:
    """A key of DATASETS: the dataset the description names first (most specific name first), else by
    data.image_size (>= 64 px: ImageNet, else Fashion-MNIST)."""
    desc = cfg.get("description", "").lower()
    for key, names in (("imagenet100", ("imagenet-100", "imagenet100")), ("cifar100", ("cifar-100", "cifar100")),
                       ("cifar10", ("cifar-10", "cifar10"))):
        if any(n in desc for n in names):
            return key
    if "imagenet" in desc:
        return "imagenet"
    if "fashion" in desc or "fmnist" in desc:
        return "fmnist"
    return "imagenet" if cfg["data"]["image_size"] >= 64 else "fmnist"


@functools.lru_cache(maxsize=None)
def model_costs(arch: str, image_size: int, projector: tuple[int, ...] = (), projector_bias: bool = True) -> dict:
    """Forward FLOPs per image of the backbone and the projector, and the six probe input dims.

    Counted on the meta device (no memory, no compute) at batch 2, divided by 2.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from barlow.model import backbone, level_channels, projector as make_projector
    from barlow.probe import Probes

    batch = 2
    with torch.device("meta"):
        net = backbone(arch).eval()
        with FlopCounterMode(display=False) as fc:
            net(torch.empty(batch, 3, image_size, image_size))
        backbone_flops = fc.get_total_flops() / batch
        proj_flops = 0.0
        if projector:
            proj = make_projector(level_channels(net)[-1], list(projector), projector_bias).eval()
            with FlopCounterMode(display=False) as fc:
                proj(torch.empty(batch, level_channels(net)[-1]))
            proj_flops = fc.get_total_flops() / batch
        dims = Probes(net, image_size).dims()
    return {"backbone": float(backbone_flops), "projector": float(proj_flops), "dims": dict(dims)}


@functools.lru_cache(maxsize=None)
def model_memory(arch: str, image_size: int, projector: tuple[int, ...] = (), projector_bias: bool = True) -> dict:
    """Per-image activation bytes (fp32) and parameter counts, measured on the meta device.

    train_bytes: bytes autograd saves per image for backbone + projector (batch 4 minus batch 2,
    halved; an upper bound, see the module docstring); infer_bytes: 2 x the largest input + output of
    any layer of the backbone in eval mode without grad; backbone / projector: parameter counts.
    """
    import torch

    from barlow.model import backbone, level_channels, projector as make_projector

    def saved(net, proj, batch):
        sizes = []

        def pack(t):
            sizes.append(t.untyped_storage().nbytes())
            return t

        with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = net(torch.empty(batch, 3, image_size, image_size))
            if proj is not None:
                proj(y)
        return sum(sizes)

    with torch.device("meta"):
        net = backbone(arch).train()
        proj = make_projector(level_channels(net)[-1], list(projector), projector_bias).train() if projector else None
    train_bytes = (saved(net, proj, 4) - saved(net, proj, 2)) / 2
    peak = [0]

    def hook(module, inputs, output):
        n = sum(t.numel() for t in inputs if torch.is_tensor(t)) + (output.numel() if torch.is_tensor(output) else 0)
        peak[0] = max(peak[0], n)

    with torch.device("meta"):
        frozen = backbone(arch).eval()
        hooks = [m.register_forward_hook(hook) for m in frozen.modules() if not list(m.children())]
        with torch.no_grad():
            frozen(torch.empty(1, 3, image_size, image_size))
        for h in hooks:
            h.remove()
    return {"train_bytes": float(train_bytes), "infer_bytes": float(2 * 4 * peak[0]),
            "backbone": sum(p.numel() for p in net.parameters()),
            "projector": sum(p.numel() for p in proj.parameters()) if proj is not None else 0}


def _cached_dims(cfg: dict, pcfg: dict) -> int:
    m = cfg["model"]
    costs = model_costs(m["arch"], cfg["data"]["image_size"], tuple(m["projector"]),
                        m["projector_bias"])
    return sum(costs["dims"][h] for h in pcfg["heads"])


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
            feats = (math.ceil(n / world) + math.ceil(val_images / world)) * _cached_dims(cfg, pcfg) * 2 / GIB
        worst = max(worst, loader + feats)
    return tasks_per_node * (per_task + worst)


def _state_bytes(p: dict) -> int:
    """Optimizer state per parameter (fp32): LARS / SGD one momentum buffer, AdamW two moments."""
    return 8 if p["optimizer"] == "adamw" else 4


def _micro_batch(p: dict, world: int) -> int:
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
    p, m = cfg["pretrain"], cfg["model"]
    size = cfg["data"]["image_size"]
    world = max(1, nodes * tasks_per_node)
    n = min(train_images, p["limit_train"]) if p["limit_train"] else train_images
    mem = model_memory(m["arch"], size, tuple(m["projector"]), m["projector_bias"])
    params = mem["backbone"] + mem["projector"]
    mon = p["monitor"]
    loaders = 3 if mon["enabled"] else 1  # training + the monitor's bank and query loaders
    per_task = (PROCESS_GB + _loader_gb(_micro_batch(p, world), size, 2)
                + (_loader_gb(mon["batch_size"], size, 1) if mon["enabled"] else 0.0)  # one at a time
                + loaders * n * FFCV_TABLE_BYTES / GIB
                + params * (4 + _state_bytes(p)) / GIB)
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


def monitor_evaluations(total_steps: int, steps_per_epoch: int, every_steps: int, at_epoch_end: bool = False) -> int:
    """How many optimizer steps of 1..total_steps the monitor evaluates after (barlow.monitor.Monitor.due):
    multiples of every_steps, the last step, and with at_epoch_end the multiples of steps_per_epoch."""
    if total_steps < 1:
        return 0
    due = total_steps // every_steps
    if at_epoch_end:
        due += total_steps // steps_per_epoch - total_steps // math.lcm(every_steps, steps_per_epoch)
    counted = total_steps % every_steps == 0 or (at_epoch_end and total_steps % steps_per_epoch == 0)
    return due + (0 if counted else 1)


def monitor_cost(cfg: dict, train_images: int, steps: int, world: int, classes: int) -> dict:
    """The monitor's share of pretraining (see the module docstring): evaluations, images per
    evaluation, FLOPs per GPU (extraction sharded over ``world`` tasks + rank 0's kNN), ``share`` of the
    pretraining FLOPs per GPU, ``loader_share`` (its bound when loading limits), and the online linear
    head's FLOPs per step and share."""
    from barlow.monitor import subsets

    cfg = complete(cfg)
    p, m = cfg["pretrain"], cfg["model"]
    mon = p["monitor"]
    size = cfg["data"]["image_size"]
    costs = model_costs(m["arch"], size, tuple(m["projector"]), m["projector_bias"])
    dim = costs["dims"]["avgpool"]
    n = min(train_images, p["limit_train"]) if p["limit_train"] else train_images
    bs = p["batch_size"]
    d = m["projector"][-1]
    train_per_gpu = steps * bs * (2 * 3 * (costs["backbone"] + costs["projector"]) + 3 * 2 * d * d) / world
    bank, queries = (len(x) for x in subsets(n, mon["bank"], mon["queries"])) if n else (0, 0)
    evals = monitor_evaluations(steps, max(1, n // bs), mon["every_steps"], mon["at_epoch_end"]) \
        if mon["enabled"] else 0
    extract = evals * (bank + queries) * costs["backbone"] / world
    knn = evals * 2.0 * bank * queries * dim
    head_step = 3 * 2.0 * dim * classes * _micro_batch(p, world) if mon["enabled"] else 0.0
    step_per_gpu = train_per_gpu / max(1, steps)
    return {"evaluations": evals, "bank": bank, "queries": queries, "dim": dim,
            "flops_per_gpu": extract + knn, "share": (extract + knn) / train_per_gpu if train_per_gpu else 0.0,
            "loader_share": evals * (bank + queries) / (steps * bs) if steps else 0.0,
            "head_flops_per_step": head_step, "head_share": head_step / step_per_gpu if step_per_gpu else 0.0}


def page_cache_sizes(cfg: dict, n_train: int, n_val: int, beton: dict | None = None) -> dict:
    """{"train": BetonSize, "val": BetonSize}: the measured ones given in ``beton``
    (barlow.beton_size.for_dataset), else the documented fallback, labelled assumed."""
    from barlow import beton_size

    out = dict(beton or {})
    for split, n in (("train", n_train), ("val", n_val)):
        if split not in out:
            out[split] = beton_size.assumed(dataset_of(cfg), split, n)
    return out


def image_counts(cfg: dict, images: int | None = None, val_images: int | None = None) -> tuple[int, int]:
    """(train, val) images: the dataset's known sizes unless overridden."""
    n_train, n_val = DATASETS[dataset_of(cfg)][:2]
    return (int(images) if images is not None else n_train, int(val_images) if val_images is not None else n_val)


def _measured_counts(beton: dict, images: int | None, val_images: int | None) -> tuple[int | None, int | None]:
    """The image counts of measured .beton sizes, where no count was given."""
    return (images if images is not None or "train" not in beton else beton["train"].images,
            val_images if val_images is not None or "val" not in beton else beton["val"].images)


def _throughput(gpu_tflops: float, fp32: bool) -> float:
    return gpu_tflops * 1e12 * (FP32_RATIO if fp32 else 1.0)


def estimate(cfg: dict, images: int | None = None, gpu_tflops: float = 150.0, gpus: int = 8, *,
             val_images: int | None = None, cpu_cores: int = 16, probe_gpus: int | None = None,
             gpus_per_node: int = 8, beton: dict | None = None) -> list[dict]:
    """One dict per stage: convert, pretrain, probe:<pass> (and a total).

    Keys: stage, images (train images the stage reads per epoch), epochs, steps (optimizer steps;
    for probes: batches of the pass), flops, gflop_per_image (FLOPs per train image per epoch),
    gpu_hours, wall_hours, cpu_hours, note; memory: gpu_gb (per GPU), host_gb (per node, without
    page cache), cache_gb (page cache of the .beton files per node), cpus (per task), tasks_per_node;
    pretrain also: mem_gb (host + page cache per node, what to ask for), monitor (``monitor_cost``).
    ``gpus``: pretraining tasks (one per GPU); ``probe_gpus``: the probe's (default ``gpus``);
    ``gpus_per_node``: tasks per node of either; ``beton``: {"train", "val": barlow.beton_size.BetonSize},
    measured (``beton_size.for_dataset``): their image counts replace the dataset's known ones unless
    ``images`` / ``val_images`` are given; without, the documented fallback sizes (assumed).
    See the module docstring for the assumptions.
    """
    cfg = complete(cfg)
    probe_gpus = gpus if probe_gpus is None else probe_gpus
    if gpu_tflops <= 0 or gpus < 1 or cpu_cores < 1 or probe_gpus < 1 or gpus_per_node < 1:
        raise ValueError("gpu_tflops must be > 0, gpus, probe_gpus, gpus_per_node and cpu_cores >= 1")
    ds = dataset_of(cfg)
    beton = beton or {}
    n_train, n_val = image_counts(cfg, *_measured_counts(beton, images, val_images))
    classes, convert_rate = DATASETS[ds][2:]
    size = cfg["data"]["image_size"]
    m, p = cfg["model"], cfg["pretrain"]
    costs = model_costs(m["arch"], size, tuple(m["projector"]), m["projector_bias"])
    mem = model_memory(m["arch"], size, tuple(m["projector"]), m["projector_bias"])
    sizes = page_cache_sizes(cfg, n_train, n_val, beton)
    beton_tr, beton_va = sizes["train"].gb, sizes["val"].gb
    rows: list[dict] = []

    cpu_h = (n_train + n_val) / convert_rate / 3600
    rows.append({"stage": "convert", "images": n_train + n_val, "epochs": None, "steps": None, "flops": 0.0,
                 "gflop_per_image": 0.0, "gpu_hours": 0.0, "wall_hours": cpu_h / cpu_cores, "cpu_hours": cpu_h,
                 "gpu_gb": 0.0, "host_gb": None, "cache_gb": None, "cpus": cpu_cores, "tasks_per_node": 1,
                 "note": f"{convert_rate:g} images/s/core, {cpu_cores} cores"})

    # Pretraining (none for pretrain.init: checkpoint: the probes read a released file)
    n = min(n_train, p["limit_train"]) if p["limit_train"] else n_train
    bs = p["batch_size"]
    steps = 0
    if p["init"] not in ("random", "checkpoint") and p["epochs"] > 0:
        steps = max(1, math.ceil(p["epochs"] * (n // bs)))
        if p["max_steps"]:
            steps = min(steps, p["max_steps"])
    d = m["projector"][-1]
    per_sample = 2 * 3 * (costs["backbone"] + costs["projector"]) + 3 * 2 * d * d
    flops = steps * bs * per_sample
    fp32 = p["precision"] == "fp32"
    gpu_h = flops / _throughput(gpu_tflops, fp32) / 3600
    params = mem["backbone"] + mem["projector"]
    per_gpu = _micro_batch(p, gpus)
    act = per_gpu * 2 * mem["train_bytes"] * (1.0 if fp32 else 0.5)
    mon = monitor_cost(cfg, n_train, steps, gpus, classes)
    # the monitor's features, gathered on every rank (+ the stacking copy), and one kNN chunk on rank 0
    mon_gpu = (2 * (mon["bank"] + mon["queries"]) * mon["dim"] + KNN_CHUNK * mon["bank"]) * 4 \
        if p["monitor"]["enabled"] else 0
    state = 4 + 4 + _state_bytes(p) + (0 if fp32 else 2)  # weights, grads, optimizer state (+ fp16 copies)
    gpu_gb = (params * state + act + 4 * d * d * 4 + mon_gpu) / GIB + CUDA_RESERVE_GB
    tpn = min(gpus, gpus_per_node)
    nodes = math.ceil(gpus / tpn)
    host = pretrain_memory_gb(cfg, n_train, nodes=nodes, tasks_per_node=tpn)
    if p["init"] == "checkpoint":
        rows.append({"stage": "pretrain", "images": 0, "epochs": None, "steps": 0, "flops": 0.0,
                     "gflop_per_image": 0.0, "gpu_hours": 0.0, "wall_hours": 0.0, "cpu_hours": 0.0, "gpu_gb": 0.0,
                     "host_gb": None, "cache_gb": None, "cpus": None, "tasks_per_node": None,
                     "note": "none: pretrain.init checkpoint (the probes read the released weights)"})
    else:
        rows.append({"stage": "pretrain", "images": n, "epochs": p["epochs"], "steps": steps, "flops": flops,
                     "gflop_per_image": per_sample / 1e9, "gpu_hours": gpu_h, "wall_hours": gpu_h / gpus,
                     "cpu_hours": 0.0, "gpu_gb": gpu_gb, "host_gb": host, "cache_gb": beton_tr,
                     "mem_gb": pretrain_memory_gb(cfg, n_train, nodes=nodes, tasks_per_node=tpn,
                                                  beton_bytes=sizes["train"].bytes),
                     "monitor": mon, "cpus": p["workers"] + 1, "tasks_per_node": tpn,
                     "note": f"{'fp32' if fp32 else p['precision']}, batch {bs} x accumulation "
                     f"{p['accumulation']} ({per_gpu}/GPU on {gpus} GPUs)"})

    # Probes
    pc = cfg.get("probe")
    for pcfg in (pc or {}).get("passes", []):
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
        dims = sum(costs["dims"][h] for h in pcfg["heads"])
        per_gpu = math.ceil(pbs / probe_gpus)
        head_params = sum((costs["dims"][h] + 1) * classes for h in pcfg["heads"])
        gpu_gb = (mem["backbone"] * 4 + head_params * 12 + per_gpu * (mem["infer_bytes"] + 3 * dims * 4)) / GIB \
            + CUDA_RESERVE_GB
        tpn = min(probe_gpus, gpus_per_node)
        nodes = math.ceil(probe_gpus / tpn)
        host = probe_memory_gb({**cfg, "probe": {**pc, "passes": [pcfg]}}, n_train, n_val, nodes=nodes,
                               tasks_per_node=tpn)
        rows.append({"stage": f"probe:{pcfg['name']}", "images": npr, "epochs": epochs, "steps": epochs * (npr // pbs),
                     "flops": flops, "gflop_per_image": flops / max(1, epochs * npr) / 1e9, "gpu_hours": gpu_h,
                     "wall_hours": gpu_h / probe_gpus, "cpu_hours": 0.0, "gpu_gb": gpu_gb, "host_gb": host,
                     "cache_gb": beton_tr + beton_va, "cpus": pc["workers"] + 1, "tasks_per_node": tpn,
                     "note": ("cached fp16 features, " if pcfg["cached"] else "frozen forward every epoch, ")
                     + f"fp32, batch {pbs}, {len(pcfg['heads'])} head(s), on {probe_gpus} GPUs"})

    rows.append({"stage": "total", "images": None, "epochs": None, "steps": None, "flops": sum(r["flops"] for r in rows),
                 "gflop_per_image": None, "gpu_hours": sum(r["gpu_hours"] for r in rows),
                 "wall_hours": sum(r["wall_hours"] for r in rows), "cpu_hours": sum(r["cpu_hours"] for r in rows),
                 "gpu_gb": None, "host_gb": None, "cache_gb": None, "cpus": None, "tasks_per_node": None,
                 "note": "stages run one after another"})
    return rows


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _num(v) -> str:
    """Readable at any magnitude: 19,684 / 36.5 / 0.0123 / 0."""
    if v is None:
        return "-"
    if v == 0 or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def print_estimate(cfg: dict, images: int | None = None, gpu_tflops: float = 150.0, gpus: int = 8, *,
                   val_images: int | None = None, cpu_cores: int = 16, probe_gpus: int | None = None,
                   gpus_per_node: int = 8, beton: dict | None = None, file=None) -> list[dict]:
    """Print ``estimate(...)`` as a table (and return its rows)."""
    import sys

    out = file or sys.stdout
    cfg = complete(cfg)
    probe_gpus = gpus if probe_gpus is None else probe_gpus
    rows = estimate(cfg, images, gpu_tflops, gpus, val_images=val_images, cpu_cores=cpu_cores, probe_gpus=probe_gpus,
                    gpus_per_node=gpus_per_node, beton=beton)
    m = cfg["model"]
    size = cfg["data"]["image_size"]
    costs = model_costs(m["arch"], size, tuple(m["projector"]), m["projector_bias"])
    ds = dataset_of(cfg)
    n_train, n_val = image_counts(cfg, *_measured_counts(beton or {}, images, val_images))
    sizes = page_cache_sizes(cfg, n_train, n_val, beton)

    def w(s=""):
        print(s, file=out)

    w(f"estimate: {cfg.get('description', '(no description)')}")
    w(f"  data: {DATASET_NAMES[ds]}, {n_train:,} train / {n_val:,} val images")
    w(f"  model: {m['arch']} @ {size} px: {costs['backbone'] / 1e9:.3f} GFLOP forward/image "
      f"({costs['backbone'] / 2e9:.2f} GMAC), projector {m['projector']}: {costs['projector'] / 1e9:.3f} GFLOP")
    w(f"  GPUs: {gpus} x {gpu_tflops:g} TFLOP/s sustained (mixed precision; fp32 stages at {FP32_RATIO:g}x), "
      "perfect scaling")
    w()
    head = f"{'stage':<22} {'epochs':>7} {'steps':>10} {'PFLOP':>10} {'GFLOP/img':>10} {'GPU-h':>9} " \
           f"{'wall-h':>9} {'CPU-h':>8}  note"
    w(head)
    w("-" * len(head))
    for r in rows:
        if r["stage"] == "total":
            w("-" * len(head))
        w(f"{r['stage']:<22} {_fmt(r['epochs'], 'g'):>7} {_fmt(r['steps'], ',d'):>10} {_num(r['flops'] / 1e15):>10} "
          f"{_num(r['gflop_per_image']):>10} {_num(r['gpu_hours']):>9} {_num(r['wall_hours']):>9} "
          f"{_num(r['cpu_hours']):>8}  {r['note']}")
    w()
    w(f"wall-h: pretrain on {gpus} GPUs, probes on {probe_gpus} (data-parallel over launcher.probe nodes x "
      f"tasks_per_node), convert on {cpu_cores} CPU cores. A FLOP estimate is the compute-bound "
      "floor: the official Barlow Twins run sustained ~5-7 TFLOP/s per V100 (2.7k-4k V100-h for 1000 epochs); "
      "pass --gpu-tflops what your GPUs sustain on this pipeline.")
    w()
    head = f"{'memory (GB = GiB)':<22} {'tasks/node':>10} {'GPU GB/GPU':>11} {'host GB/node':>13} " \
           f"{'page cache GB/node':>19} {'CPUs/task':>10}"
    w(head)
    w("-" * len(head))
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
    if pre.get("monitor"):
        _print_monitor(w, cfg, pre, gpus)
    return rows


def _print_monitor(w, cfg: dict, pre: dict, gpus: int) -> None:
    mon, s = pre["monitor"], cfg["pretrain"]["monitor"]
    w()
    if not s["enabled"]:
        w("monitor: off (pretrain.monitor.enabled false)")
        return
    size = cfg["data"]["image_size"]
    fwd = model_costs(cfg["model"]["arch"], size, tuple(cfg["model"]["projector"]),
                      cfg["model"]["projector_bias"])["backbone"]
    w(f"monitor: {mon['evaluations']:,} evaluations (every {s['every_steps']:,} of {pre['steps']:,} steps and the "
      f"last; epoch ends {'too' if s['at_epoch_end'] else 'no'}) x {mon['bank'] + mon['queries']:,} images (bank "
      f"{mon['bank']:,} + queries {mon['queries']:,}) x {fwd / 1e9:.2f} GFLOP forward at {size} px, "
      f"sharded over {gpus} GPUs, + kNN on rank 0: {100 * mon['share']:.2f} % of pretraining compute "
      f"(at most {100 * mon['loader_share']:.2f} % where the loader, not the GPU, is the limit)")
    w(f"  online linear head: {mon['head_flops_per_step'] / 1e9:.3g} GFLOP per step on rank 0 "
      f"({100 * mon['head_share']:.3f} % of a step: negligible)")
