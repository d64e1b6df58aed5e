"""ResNet backbone (torchvision), the Barlow Twins projector, and the six probe features.

The backbone is a torchvision ResNet with its classifier removed. ``features()`` runs the same
forward pass but also returns the five intermediate maps the benchmark probes:
Feature1 = stem after conv1+BN+ReLU (before max-pool), Feature2..5 = layer1..layer4.
"""
from __future__ import annotations

import torch
from torch import nn

from barlow.errors import BadInput

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def backbone(arch: str, zero_init_residual: bool = True) -> nn.Module:
    from barlow.torchvision_import import import_torchvision

    torchvision = import_torchvision()
    if arch not in ARCHS:
        raise BadInput(f"model.arch {arch!r}: unknown; use one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    net.fc = nn.Identity()
    return net


def level_channels(net: nn.Module) -> list[int]:
    """Channels of Feature1..5 (stem, layer1..4)."""
    def out_ch(layer):
        block = layer[-1]
        return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels
    return [net.conv1.out_channels] + [out_ch(getattr(net, f"layer{i}")) for i in range(1, 5)]


def features(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """[stem, layer1, layer2, layer3, layer4] maps of one forward pass (torchvision's forward, unrolled)."""
    stem = net.relu(net.bn1(net.conv1(x)))
    out = [stem]
    h = net.maxpool(stem)
    for i in range(1, 5):
        h = getattr(net, f"layer{i}")(h)
        out.append(h)
    return out


LINEAR_INITS = {  # projector_init -> weight init (None: PyTorch's default); biases start at 0
    "torch": None,
    "kaiming_fan_out": lambda w: nn.init.kaiming_uniform_(w, a=0, mode="fan_out", nonlinearity="relu"),
    "kaiming_normal_fan_in": lambda w: nn.init.kaiming_normal_(w, a=0, mode="fan_in", nonlinearity="relu"),
}


def projector(in_dim: int, sizes: list[int], bias: bool = True, init: str = "torch") -> nn.Sequential:
    """Linear-BN-ReLU blocks, last Linear without BN/ReLU (and without bias, as published).

    ``init``: ``torch`` keeps PyTorch's Linear default (the official main.py); ``kaiming_fan_out``
    is MMSelfSup's ``init_cfg=dict(type='Kaiming', distribution='uniform', layer=['Linear'])`` with
    mmcv's defaults (a=0, mode='fan_out', nonlinearity='relu'): U(±√(6 / out_features)).
    ``kaiming_normal_fan_in`` is OpenMixup's NonLinearNeck ``init_weights(init_linear='kaiming')``:
    mmcv ``kaiming_init(m, mode='fan_in', nonlinearity='relu')`` = N(0, 2 / in_features), bias 0.
    """
    dims = [in_dim, *sizes]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b, bias=bias), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    if init not in LINEAR_INITS:
        raise BadInput(f"model.projector_init {init!r}: unknown; use {', '.join(LINEAR_INITS)}")
    if LINEAR_INITS[init] is not None:
        for layer in (x for x in layers if isinstance(x, nn.Linear)):
            LINEAR_INITS[init](layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """backbone -> global average pool -> projector. The loss lives in ``barlow.loss``."""

    def __init__(self, arch: str, projector_sizes: list[int], zero_init_residual: bool = True, projector_bias: bool = True,
                 projector_init: str = "torch"):
        super().__init__()
        self.backbone = backbone(arch, zero_init_residual)
        self.projector = projector(level_channels(self.backbone)[-1], projector_sizes, projector_bias, projector_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))
