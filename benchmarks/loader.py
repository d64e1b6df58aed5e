"""Figure ``loader_full_aug``: the two-view loader with the full Barlow Twins augmentation.

Ours (as barlow/pretrain.py does it): ``barlow.loader.make_loader(views=2, decode="simple")`` on a
Fashion-MNIST .beton (FFCV decodes uint8 batches with 2 worker threads), then
``barlow.augment.BatchAugment`` on each view (``barlow_views(32)``: crop 0.08-1 bicubic, flip,
ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur p 1.0 / 0.1, solarize 0 / 0.2, normalize)
and the channels_last copy the fmnist_r18 preset asks for.

Peer: a torchvision ``transforms.v2`` pipeline doing the same augmentation per sample, in a
``torch.utils.data.DataLoader`` with the same number of workers (2 processes), on the same images
held in memory as uint8 tensors (the cheapest input a DataLoader can have: no decoding at all).
The v2 ops run on uint8 tensors and convert to float at the end (faster than float throughout);
the crop uses ``antialias=False``, the numerics ours reproduces.

Both loaders are built and warmed up once (FFCV's numba compilation, the workers' start); then
whole epochs alternate ours, peer, ours, peer, ... and the medians are reported.
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import (base_parser, cache_dir, emit, figure, fmnist_beton, load, log, median)


class InMemoryTwoViews(torch.utils.data.Dataset):
    """uint8 3x32x32 tensors in memory -> (view1, view2), label, each view its own v2 transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, t1, t2):
        self.images, self.labels, self.t1, self.t2 = images, labels, t1, t2

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.t1(img), self.t2(img)), int(self.labels[i])


def v2_transform(size: int, blur_p: float, solarize_p: float, mean, std):
    from torchvision.transforms import InterpolationMode, v2

    ops = [
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=False),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 2.0))], p=blur_p),  # 3 = ours at 32 px
        v2.RandomSolarize(threshold=128, p=solarize_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]
    return v2.Compose(ops)


def fmnist_tensors(n: int):
    from barlow.convert import FashionMNIST
    from benchmarks.common import FMNIST

    src = FashionMNIST(str(FMNIST), "train", 32)
    imgs = torch.stack([torch.from_numpy(src[i][0]).permute(2, 0, 1).contiguous() for i in range(n)])
    return imgs, torch.as_tensor(src.labels[:n].astype("int64"))


def main(argv=None):
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, help="images per epoch (default 4096 quick / 20480 full)")
    ap.add_argument("--batch-size", type=int, default=128, help="the fmnist_r18 preset's batch")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, help="alternating epochs per side (default 3 quick / 5 full)")
    args = ap.parse_args(argv)
    n = args.images or (4096 if args.quick else 20480)
    reps = args.reps or (3 if args.quick else 5)
    bs, workers = args.batch_size, args.workers

    from barlow.augment import BatchAugment, barlow_views
    from barlow.loader import make_loader, split_batch

    load_before = load()
    beton = fmnist_beton(cache_dir(args), "train", n)
    v1, v2 = barlow_views(32)  # the full published recipe, ImageNet mean/std
    aug1, aug2 = BatchAugment(v1), BatchAugment(v2)
    ffcv = make_loader(beton, bs, views=2, train=True, workers=workers, seed=0, decode="simple")

    imgs, labels = fmnist_tensors(n)
    ds = InMemoryTwoViews(imgs, labels, v2_transform(32, v1.blur_p, v1.solarize_p, v1.mean, v1.std),
                          v2_transform(32, v2.blur_p, v2.solarize_p, v2.mean, v2.std))
    tv = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
                                     persistent_workers=True, generator=torch.Generator().manual_seed(0))

    epoch_no = [0]

    def ours() -> float:
        seen = 0
        t0 = time.perf_counter()
        it = iter(ffcv)
        try:
            for i, batch in enumerate(it):
                (x1, x2), _ = split_batch(batch, 2)
                g = torch.Generator().manual_seed(epoch_no[0] * 100_003 + i)
                y1 = aug1(x1, g).contiguous(memory_format=torch.channels_last)
                aug2(x2, g).contiguous(memory_format=torch.channels_last)
                seen += y1.shape[0]
        finally:
            it.close()
        epoch_no[0] += 1
        return seen / (time.perf_counter() - t0)

    def peer() -> float:
        seen = 0
        t0 = time.perf_counter()
        for (y1, y2), _ in tv:
            seen += y1.shape[0]
        return seen / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    warm_ours = ours()
    t_warm_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_peer = peer()
    t_warm_peer = time.perf_counter() - t0
    log(f"warm-up epochs: ours {t_warm_ours:.1f} s (incl. numba JIT), peer {t_warm_peer:.1f} s (incl. worker start)")
    ra, rb = [], []
    for i in range(reps):
        ra.append(ours())
        rb.append(peer())
        log(f"  rep {i + 1}/{reps}: ours {ra[-1]:,.0f}/s  torchvision v2 {rb[-1]:,.0f}/s")
    a, b = median(ra), median(rb)
    details = {
        "images_per_epoch": n, "batch_size": bs, "workers": workers, "views": 2, "image_size": 32,
        "reps_alternating": reps, "ours_samples_per_s": [round(x, 1) for x in ra],
        "peer_samples_per_s": [round(x, 1) for x in rb],
        "warmup_epoch_s": {"ours_incl_numba_jit": round(t_warm_ours, 2), "peer_incl_worker_start": round(t_warm_peer, 2)},
        "warmup_samples_per_s": {"ours": round(warm_ours, 1), "peer": round(warm_peer, 1)},
        "ours": "FFCV Loader(views=2, SimpleRGBImageDecoder, 2 threads) + BatchAugment x2 + channels_last, in the main process",
        "peer_pipeline": "torchvision.transforms.v2 on uint8 CHW tensors in memory: RandomResizedCrop(32, 0.08-1, bicubic, "
                         "antialias=False), flip, ColorJitter(0.4,0.4,0.2,0.1) p0.8, Grayscale p0.2, GaussianBlur(3, 0.1-2) "
                         "p1.0/0.1, Solarize(128) p0/0.2, ToDtype float, Normalize; DataLoader(num_workers=2, persistent)",
        "target_ratio": 5.0, "torch_threads": torch.get_num_threads(),
        "load_avg_before": load_before, "load_avg_after": load(), "mode": "quick" if args.quick else "full",
    }
    emit(args, [figure("loader_full_aug", a, "samples/s", "torchvision transforms.v2 DataLoader (2 workers)", b,
                       a / b, details)])


if __name__ == "__main__":
    main()
