"""What an experiment is made of, for ``barlow.estimate``: the datasets' sizes and the model's forward
FLOPs, activation bytes and parameter counts, measured on the meta device (no memory, no compute; torch
is imported only when a count is asked for). The assumptions behind the numbers: barlow/estimate.py's
docstring.

FLOPs, probe dims and parameter counts of the torchvision ResNets are also counted without torch, from
their layer list (``counted``): ``costs_of`` and ``params_of`` use that, so a stage's launcher sizes its
job without importing torch (tests/test_launch.py checks it equals the meta-device measurement).
"""
from __future__ import annotations

import functools
import math

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


# torchvision's ResNets: block kind and blocks per stage (layer1..layer4)
RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
           "resnet152": ("bottleneck", (3, 8, 36, 3))}
# barlow.heads' pooling: the published table at ResNet-50 / 224 px, else about TARGET_DIMS per level
PUBLISHED_MAPS, PUBLISHED_CHANNELS = (112, 56, 28, 14, 7), (64, 256, 512, 1024, 2048)
PUBLISHED_POOL = ((10, 10, 4), (16, 8, 0), (13, 5, 0), (8, 3, 0), (6, 1, 0))
TARGET_DIMS = 9216


def _side(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


def _resnet(arch: str, image_size: int) -> tuple[int, int, list[int], list[int]] | None:
    """(parameters, forward FLOPs per image, channels and sides of Feature1..5) of torchvision's ``arch``
    without its classifier: every convolution (no bias) and the BatchNorm after it; FLOPs as
    FlopCounterMode counts them (2 x multiply-accumulates of convolutions). None for another model."""
    if arch not in RESNETS:
        return None
    kind, blocks = RESNETS[arch]
    params = flops = 0

    def conv(cin: int, cout: int, k: int, s: int, h: int) -> int:
        nonlocal params, flops
        out = _side(h, k, s, k // 2)
        params += cout * cin * k * k + 2 * cout
        flops += 2 * cout * out * out * cin * k * k
        return out

    h = conv(3, 64, 7, 2, image_size)
    channels, sides, cin = [64], [h], 64
    h = _side(h, 3, 2, 1)  # max-pool
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        cout = planes * (1 if kind == "basic" else 4)
        for b in range(n):
            s = 2 if i and not b else 1
            if kind == "basic":
                out = conv(planes, planes, 3, 1, conv(cin, planes, 3, s, h))
            else:  # torchvision's v1.5: the stride on the 3x3
                out = conv(planes, cout, 1, 1, conv(planes, planes, 3, s, conv(cin, planes, 1, 1, h)))
            if s != 1 or cin != cout:
                conv(cin, cout, 1, s, h)  # the downsample
            cin, h = cout, out
        channels.append(cout)
        sides.append(h)
    return params, flops, channels, sides


def _pooled_sides(channels: list[int], sides: list[int]) -> list[int]:
    """The side of each level after barlow.heads.pooling_plan (``auto``)."""
    if tuple(sides) == PUBLISHED_MAPS and tuple(channels) == PUBLISHED_CHANNELS:
        return [_side(h, k, s, p) for h, (k, s, p) in zip(sides, PUBLISHED_POOL)]
    return [min(h, max(1, round(math.sqrt(TARGET_DIMS / c)))) for c, h in zip(channels, sides)]


@functools.lru_cache(maxsize=None)
def counted(arch: str, image_size: int, projector: tuple[int, ...] = (), projector_bias: bool = True) -> dict | None:
    """``model_costs`` plus the parameter counts of ``model_memory`` (``params``: backbone, projector),
    counted from the layer list, without torch; None where only the meta device can say (another
    model, or an image too small for it: ``model_costs`` then raises the error)."""
    net = _resnet(arch, image_size)
    if net is None or min(net[3]) < 1:
        return None
    params, flops, channels, sides = net
    dims = [channels[-1], *projector]
    linears = list(zip(dims[:-1], dims[1:]))
    proj_params = sum(a * b + (b if projector_bias else 0) + 2 * b for a, b in linears[:-1])  # Linear + BN
    proj_params += linears[-1][0] * linears[-1][1] if linears else 0  # the last Linear: no bias
    pooled = _pooled_sides(channels, sides)
    return {"backbone": float(flops), "projector": float(sum(2 * a * b for a, b in linears)),
            "dims": {**{f"feature{i + 1}": c * s * s for i, (c, s) in enumerate(zip(channels, pooled))},
                     "avgpool": channels[-1]},
            "params": {"backbone": params, "projector": proj_params}}


def _key(cfg: dict) -> tuple:
    m = cfg["model"]
    return m["arch"], cfg["data"]["image_size"], tuple(m["projector"]), m["projector_bias"]


def costs_of(cfg: dict) -> dict:
    """``model_costs`` of a (completed) config's model at its image size (counted without torch where it can)."""
    c = counted(*_key(cfg))
    return model_costs(*_key(cfg)) if c is None else {k: c[k] for k in ("backbone", "projector", "dims")}


def params_of(cfg: dict) -> dict:
    """Parameter counts (backbone, projector) of a (completed) config's model, as ``model_memory`` has them
    (counted without torch where it can)."""
    c = counted(*_key(cfg))
    mem = memory_of(cfg) if c is None else c["params"]
    return {"backbone": mem["backbone"], "projector": mem["projector"]}


def memory_of(cfg: dict) -> dict:
    """``model_memory`` of a (completed) config's model at its image size."""
    return model_memory(*_key(cfg))


def image_counts(cfg: dict, images: int | None = None, val_images: int | None = None) -> tuple[int, int]:
    """(train, val) images: the dataset's known sizes unless overridden."""
    n_train, n_val = DATASETS[dataset_of(cfg)][:2]
    return (int(images) if images is not None else n_train, int(val_images) if val_images is not None else n_val)

