"""What an experiment is made of, for ``barlow.estimate``: the datasets' sizes and the model's forward
FLOPs, activation bytes and parameter counts, measured on the meta device (no memory, no compute; torch
is imported only when a count is asked for). The assumptions behind the numbers: barlow/estimate.py's
docstring.
"""
from __future__ import annotations

import functools

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
    from barlow.heads import Probes

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


def costs_of(cfg: dict) -> dict:
    """``model_costs`` of a (completed) config's model at its image size."""
    m = cfg["model"]
    return model_costs(m["arch"], cfg["data"]["image_size"], tuple(m["projector"]), m["projector_bias"])


def memory_of(cfg: dict) -> dict:
    """``model_memory`` of a (completed) config's model at its image size."""
    m = cfg["model"]
    return model_memory(m["arch"], cfg["data"]["image_size"], tuple(m["projector"]), m["projector_bias"])


def image_counts(cfg: dict, images: int | None = None, val_images: int | None = None) -> tuple[int, int]:
    """(train, val) images: the dataset's known sizes unless overridden."""
    n_train, n_val = DATASETS[dataset_of(cfg)][:2]
    return (int(images) if images is not None else n_train, int(val_images) if val_images is not None else n_val)

