"""LARS with the Barlow Twins parameter split, and the warmup + cosine learning-rate schedule.

Parameter groups (as the official code): every parameter with ``ndim == 1`` — biases and all
norm-layer weights/biases, downsample BN included — gets no weight decay, no LARS trust ratio and
``lr × bias_lr_ratio`` (0.024 = 0.0048 / 0.2 in the official code). The rest gets all three.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, bias_lr_ratio: float = 0.024) -> list[dict]:
    weights = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    vectors = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": weights, "weight_decay": weight_decay, "lars": True, "lr_ratio": 1.0},
        {"params": vectors, "weight_decay": 0.0, "lars": False, "lr_ratio": bias_lr_ratio},
    ]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in the official Barlow Twins code.

    update = g + wd·p; if the group adapts: update ·= eta·‖p‖/‖update‖ (1 where either norm is 0);
    mu = momentum·mu + update; p -= lr · mu (``set_lr`` puts base lr × the group's lr_ratio in lr). Uses ``torch._foreach_*`` kernels so the
    per-parameter Python loop of the reference does not dominate small-model steps on the CPU.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True, lr_ratio=1.0)
        super().__init__(params, defaults)
        set_lr(self, lr)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if g["weight_decay"]:
                updates = torch._foreach_add(grads, params, alpha=g["weight_decay"])
            else:
                updates = [gr.clone() for gr in grads]
            if g["lars"]:
                p_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(updates))
                one = torch.ones_like(p_norm)
                q = torch.where((p_norm > 0) & (u_norm > 0), g["eta"] * p_norm / u_norm, one)
                torch._foreach_mul_(updates, list(q.unbind()))
            mus = []
            for p, u in zip(params, updates):
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mus.append(state["mu"])
            torch._foreach_mul_(mus, g["momentum"])
            torch._foreach_add_(mus, updates)
            torch._foreach_add_(params, mus, alpha=-g["lr"])


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float,
          final_ratio: float = 0.001, warmup_start_ratio: float = 0.0) -> float:
    """Linear warmup from ``warmup_start_ratio·base`` to ``base``, then cosine to ``final_ratio·base``."""
    if step < warmup_steps:
        start = warmup_start_ratio * base_lr
        return start + (base_lr - start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    end = final_ratio * base_lr
    return end + (base_lr - end) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                   eta: float = 0.001, bias_lr_ratio: float = 0.024) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, bias_lr_ratio)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=eta)
    if name == "adamw":
        for grp in groups:
            grp.pop("lars")
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        for grp in groups:
            grp.pop("lars")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer {name!r}: unknown; use lars, adamw or sgd")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_ratio", 1.0)
