"""FFCV loaders for the ``.beton`` files that ``barlow.convert`` writes.

FFCV only decodes here (to uint8 NCHW tensors); all random augmentation happens afterwards in
``barlow.augment`` on batches, drawn from a seeded torch generator. That keeps the random
stream independent of FFCV's worker threads (whose numba RNG cannot be seeded), so a run is
reproducible and resumable mid-epoch, and the same code runs on CPU and GPU.

Images whose sizes vary (ImageNet) need a fixed-size decode: ``decode="rrc"`` uses FFCV's
RandomResizedCrop decoder (fast, but its crop randomness is FFCV's, not ours), ``decode="center"``
its center-crop decoder (for evaluation).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from barlow.errors import BadInput
from barlow.ffcv_import import import_ffcv


def close_iterator(it, timeout: float = 30.0) -> None:
    """Stop an FFCV epoch iterator and wait for its thread, so that the process may exit at once.

    FFCV 1.0.2's ``EpochIterator.close()`` only sets its terminate flag and releases the memory context: the
    thread reads the flag only while its output queue is full, so it goes on decoding batches after close()
    (into memory that close() released), and an interpreter that exits meanwhile aborts with "terminate called
    without an active exception" (exit 134; seen once here after a 40-step pretraining on 60,000 images:
    benchmarks/memory.py). Here the flag is set first, the thread joined (it returns once its queue is full, or
    at the epoch's end; a thread blocked putting the end marker into a full queue gets a slot freed), and then
    the iterator closed."""
    import queue
    import threading
    import time

    stop = getattr(it, "terminate_event", None)
    if stop is not None:
        stop.set()
    deadline = time.monotonic() + timeout
    while isinstance(it, threading.Thread) and it.is_alive() and time.monotonic() < deadline:
        it.join(1.0)
        if it.is_alive() and hasattr(it, "output_queue"):
            try:
                it.output_queue.get_nowait()
            except queue.Empty:
                pass
    it.close()


def beton_length(path: str | Path) -> int:
    """Number of samples, read from the header; a clear error for a missing or truncated file."""
    import_ffcv()
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: missing .beton file; run the convert stage first (snakemake ... convert)")
    try:
        return int(Reader(str(path)).num_samples)
    except Exception as e:  # noqa: BLE001 - FFCV raises assorted errors for damaged files
        raise BadInput(f"{path}: not a readable .beton ({type(e).__name__}); delete it and rerun convert") from None


def make_loader(path: str | Path, batch_size: int, *, views: int = 1, train: bool = True, workers: int = 2,
                seed: int = 0, decode: str = "simple", size: int | None = None, scale=(0.08, 1.0),
                distributed: bool = False, drop_last: bool | None = None, indices=None, device: str = "cpu",
                center_ratio: float = 224 / 256):
    """A Loader that yields ``(image, label[, image2])`` uint8 NCHW tensors.

    ``views=2`` decodes the same field twice (FFCV 1.0.2 cannot map one field to two outputs, but
    a second pipeline reading the same field works); the caller augments each view separately.
    """
    import_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    beton_length(path)
    import numba

    # FFCV hands num_workers to numba.set_num_threads, which refuses more threads than numba saw cores at import
    # (the affinity mask: a 1-CPU SLURM task or a pinned process); the work is the same on fewer threads.
    workers = max(1, min(workers, numba.config.NUMBA_NUM_THREADS))

    def image_pipeline():
        if decode == "simple":
            dec = SimpleRGBImageDecoder()
        elif decode == "rrc":
            dec = RandomResizedCropRGBImageDecoder((size, size), scale=tuple(scale))
        elif decode == "center":
            dec = CenterCropRGBImageDecoder((size, size), ratio=center_ratio)
        else:
            raise BadInput(f"decode {decode!r}: unknown; use simple, rrc or center")
        ops = [dec, ToTensor(), ToTorchImage()]
        if device != "cpu":
            ops.append(ToDevice(torch.device(device), non_blocking=True))
        return ops

    label_ops = [IntDecoder(), ToTensor(), Squeeze()]
    if device != "cpu":
        label_ops.append(ToDevice(torch.device(device), non_blocking=True))
    pipelines = {"image": image_pipeline(), "label": label_ops}
    if views == 2:
        ops = image_pipeline()
        pipelines["image2"] = PipelineSpec("image", decoder=ops[0], transforms=ops[1:])
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    if train and distributed:
        order = _global_random_order()
    return Loader(str(path), batch_size=batch_size, num_workers=workers, order=order, seed=seed,
                  distributed=distributed, drop_last=train if drop_last is None else drop_last,
                  pipelines=pipelines, indices=None if indices is None else np.asarray(indices),
                  os_cache=True)


def _global_random_order():
    """FFCV's RANDOM order of *one* process, dealt out to the ranks: a step holds the same samples on 1,
    2 or 8 tasks (and their augmentation follows them: barlow.augment.layout_positions).

    FFCV 1.0.2's distributed RANDOM is torch's DistributedSampler, whose permutation (torch.randperm)
    is not the one-process one (numpy's permutation of seed + epoch), and which pads the order by
    repeating its head, so 383 images at a global batch of 64 made 5 steps on 1 task and 6 on 2.
    Here: numpy's permutation, its tail beyond a multiple of the world dropped, rank r taking r,
    r + world, ... (DistributedSampler's dealing): with drop_last, floor(floor(n / world) / per-rank
    batch) = floor(n / global batch) steps, the same first samples of each step as one process.
    """
    import torch.distributed as dist
    from ffcv.traversal_order.base import TraversalOrder

    class GlobalRandom(TraversalOrder):
        def sample_order(self, epoch: int):
            order = np.random.default_rng(self.seed + epoch).permutation(self.indices)
            world, rank = dist.get_world_size(), dist.get_rank()
            return order[: len(order) // world * world][rank::world]

        def __call__(self, loader):
            return GlobalRandom(loader)

    # FFCV 1.0.2 takes a custom order only as an *instance* of TraversalOrder, which it then calls with
    # the loader (``isinstance(order, TraversalOrder)`` ... ``order(self)``): an unbound instance whose
    # call builds the real one.
    return object.__new__(GlobalRandom)


def split_batch(batch, views: int):
    """FFCV yields fields in file order, then extra outputs: (image, label, image2)."""
    if views == 2:
        image, label, image2 = batch
        return (image, image2), label
    image, label = batch[0], batch[1]
    return (image,), label
