"""Frozen features for the probes and the monitor: the evaluation and train views, and the
extraction of a split's pooled features.

Cached features stay in host memory as float16 (ImageNet's Feature1..5 would need ~245 GB in
float32); the backbone computes on its own device, whatever device the loader delivers to. With
several processes rank r extracts positions r, r + world, ... (FFCV's distributed sampler).
"""
from __future__ import annotations

import torch

from barlow.distributed import Env
from barlow.heads import device_of
from barlow.loader import beton_length, close_iterator, make_loader, split_batch

FP16_MAX = 65504.0


def eval_view(size: int, view: dict, mean, std):
    """The unaugmented view (no crop, no flip) normalised with ``mean``/``std``; ``view`` overrides any key."""
    from barlow.augment import ViewAugment

    base = dict(size=size, crop=False, flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0,
                lighting=0.0, mean=tuple(mean), std=tuple(std))
    return ViewAugment.from_dict({**base, **view})


def train_view(size: int, view: dict, mean, std):
    """The probes' train view: RandomResizedCrop (0.08-1) and flip by default; ``view`` overrides any key."""
    from barlow.augment import ViewAugment

    base = dict(size=size, crop=True, scale=(0.08, 1.0), flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                solarize_p=0.0, lighting=0.0, mean=tuple(mean), std=tuple(std))
    return ViewAugment.from_dict({**base, **view})


@torch.no_grad()
def extract(probes, path, heads, aug, pcfg, workers, seed, indices, loader_device="cpu", decode="simple",
            size=224, env: Env | None = None):
    """This rank's pooled features (host memory, float16) and labels of ``path`` in file order.

    The backbone computes on its own device, whatever device the loader delivers to. With several
    processes rank r gets positions r, r + world, ... (FFCV's distributed sampler); the sampler's
    padding (repeats of the first images, to even out the shards) is dropped.
    """
    env = env or Env()
    device = device_of(probes)
    # Variable-size images: resize to eval_resize, center crop `size` (published: 256 -> 224).
    ratio = size / pcfg.get("eval_resize", round(size * 256 / 224))
    loader = make_loader(path, max(1, pcfg["batch_size"] // env.world), train=False, workers=workers, seed=seed,
                         decode=decode, size=size, indices=indices, device=loader_device, drop_last=False,
                         center_ratio=ratio, distributed=env.world > 1)
    n = len(indices) if indices is not None else beton_length(path)
    total = len(range(env.rank, n, env.world))  # this rank's real images; the padding comes after them
    # Written into preallocated tensors: a list of per-batch chunks plus their torch.cat would
    # hold every feature twice at the end (measured: ~675 MiB more peak at 20k Fashion-MNIST images).
    feats: dict[str, torch.Tensor] = {}
    ys = torch.empty(total, dtype=torch.long)
    peak = torch.zeros((), device=device)
    at = 0
    it = iter(loader)
    try:
        for batch in it:
            (x,), y = split_batch(batch, 1)
            k_real = min(len(y), total - at)
            if k_real <= 0:
                break
            for k, v in probes.pooled(aug(x.to(device, non_blocking=True)), heads).items():
                if k not in feats:
                    feats[k] = torch.empty((total, *v.shape[1:]), dtype=torch.float16)
                v = v[:k_real]
                if v.is_meta:
                    continue  # meta tensors hold no data (the device test): nothing to copy
                peak = torch.maximum(peak, v.abs().amax())
                feats[k][at:at + k_real].copy_(v, non_blocking=False)
            ys[at:at + k_real] = y[:k_real].long().cpu()
            at += k_real
    finally:
        close_iterator(it)
    if at != total:
        raise RuntimeError(f"{path}: the loader gave {at} images to rank {env.rank}, expected {total}")
    if not peak.is_meta and float(peak) > FP16_MAX:
        raise FloatingPointError(f"{path}: a pooled feature reaches {float(peak):.3g}, beyond float16 "
                                 f"({FP16_MAX:g}), in which cached features are kept; use cached: false")
    return feats, ys
