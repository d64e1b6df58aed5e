"""One Barlow Twins step written the way facebookresearch/barlowtwins ``main.py`` writes it (re-typed, same
structure and semantics): the peer of the ``pretrain_step`` benchmark (benchmarks/step.py) and the
reference the tests check ``barlow.optim.LARS`` against (tests/test_optim.py). Not used by the pipeline.

* the loss lives in the model: projector Linear(bias=False)-BN-ReLU blocks, a final Linear(bias=False),
  then ``nn.BatchNorm1d(d, affine=False)`` on both embeddings, ``c = bn(z1).T @ bn(z2) / batch``,
  on-diagonal ``(diag(c) - 1)^2`` plus lambda times the off-diagonal squares taken through the
  flatten/view ``off_diagonal`` trick;
* LARS is a Python loop over parameters: weight decay and the trust ratio are skipped for
  ``ndim == 1`` parameters (``weight_decay_filter=True, lars_adaptation_filter=True``), momentum
  buffer ``mu``, ``p -= lr * mu``; two groups (weights, biases/norms) with their own lr;
* ``optimizer.zero_grad()``, forward, ``backward()``, ``optimizer.step()``.

On one CPU process the ``all_reduce`` of ``c`` is the identity and is left out; fp32, so no AMP
GradScaler; no channels_last (main.py keeps the default memory format).
"""
from __future__ import annotations

import torch
from torch import nn, optim

from barlow.torchvision_import import import_torchvision

torchvision = import_torchvision()


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class ReferenceBarlowTwins(nn.Module):
    def __init__(self, arch: str, projector: list[int], batch_size: int, lambd: float = 0.0051):
        super().__init__()
        self.batch_size, self.lambd = batch_size, lambd
        self.backbone = getattr(torchvision.models, arch)(zero_init_residual=True)
        feat = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        sizes = [feat, *projector]
        layers = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)

    def forward(self, y1, y2):
        z1 = self.projector(self.backbone(y1))
        z2 = self.projector(self.backbone(y2))
        c = self.bn(z1).T @ self.bn(z2)
        c.div_(self.batch_size)
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        off_diag = off_diagonal(c).pow_(2).sum()
        return on_diag + self.lambd * off_diag


class ReferenceLARS(optim.Optimizer):
    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001,
                 weight_decay_filter=False, lars_adaptation_filter=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      weight_decay_filter=weight_decay_filter,
                                      lars_adaptation_filter=lars_adaptation_filter))

    @staticmethod
    def exclude_bias_and_norm(p):
        return p.ndim == 1

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if not g["weight_decay_filter"] or not self.exclude_bias_and_norm(p):
                    dp = dp.add(p, alpha=g["weight_decay"])
                if not g["lars_adaptation_filter"] or not self.exclude_bias_and_norm(p):
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def reference_optimizer(model: nn.Module, lr_weights: float, lr_biases: float, weight_decay: float) -> ReferenceLARS:
    weights = [p for p in model.parameters() if p.ndim != 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    opt = ReferenceLARS([{"params": weights}, {"params": biases}], lr=0, weight_decay=weight_decay,
                        weight_decay_filter=True, lars_adaptation_filter=True)
    opt.param_groups[0]["lr"] = lr_weights
    opt.param_groups[1]["lr"] = lr_biases
    return opt
