"""LARS with the Barlow Twins parameter split, and the warmup + cosine learning-rate schedules.

Parameter groups (as the official code): every parameter with ``ndim == 1`` — biases and all
norm-layer weights/biases, downsample BN included — gets no weight decay, no LARS trust ratio and
``lr × bias_lr_ratio`` (0.024 = 0.0048 / 0.2 in the official code). The rest gets all three.
MMSelfSup selects the same parameters by name (tests/test_optim.py applies its regexes).

Two LARS steps and two schedules exist because the official code and MMSelfSup (whose run
produced the published table) differ; a preset names the one its numbers came from:
- ``lars: official`` (facebookresearch main.py): trust = eta·‖p‖/‖g + wd·p‖;
  mu = momentum·mu + trust·(g + wd·p); p −= lr·mu.
- ``lars: mmselfsup`` (mmselfsup/core/optimizer/optimizers.py): trust = eta·‖p‖/(‖g‖ + wd·‖p‖ + eps);
  d = (g + wd·p)·lr·trust; buf = momentum·buf + d; p −= buf — the lr sits inside the buffer.
- ``schedule: official``: linear warmup from ``warmup_start_ratio·base``, then a cosine over the
  remaining steps to ``final_ratio × each group's base``.
- ``schedule: mmcv`` (CosineAnnealingLrUpdaterHook, by iteration, linear warmup): a cosine over the
  WHOLE run from step 0 to the ABSOLUTE ``min_lr`` for every group, multiplied during warmup by a
  factor rising linearly from ``warmup_start_ratio`` to 1.
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

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 mode: str = "official", eps: float = 1e-8):
        if mode not in ("official", "mmselfsup"):
            raise ValueError(f"pretrain.lars {mode!r}: unknown; use official or mmselfsup")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True, lr_ratio=1.0,
                        mode=mode, eps=eps)
        super().__init__(params, defaults)
        set_lr(self, lr)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            if g.get("mode", "official") == "mmselfsup":
                self._step_mmselfsup(g)
                continue
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

    def _step_mmselfsup(self, g: dict) -> None:
        params = [p for p in g["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        wd = g["weight_decay"]
        if g["lars"]:
            p_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            trust = torch.where((p_norm > 0) & (g_norm > 0), g["eta"] * p_norm / (g_norm + wd * p_norm + g["eps"]),
                                torch.ones_like(p_norm))
            scale = list((trust * g["lr"]).unbind())
        else:
            scale = [g["lr"]] * len(params)
        d = torch._foreach_add(grads, params, alpha=wd) if wd else [gr.clone() for gr in grads]
        torch._foreach_mul_(d, scale)
        bufs = []
        for p, dp in zip(params, d):
            state = self.state[p]
            if "mu" not in state:
                state["mu"] = torch.zeros_like(p)  # MMSelfSup starts the buffer at d: 0·momentum + d
            bufs.append(state["mu"])
        torch._foreach_mul_(bufs, g["momentum"])
        torch._foreach_add_(bufs, d)
        torch._foreach_sub_(params, bufs)


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


def mmcv_lr(step: int, total_steps: int, warmup_steps: int, group_base_lr: float, min_lr: float,
            warmup_start_ratio: float) -> float:
    """mmcv 1.x CosineAnnealingLrUpdaterHook(by_epoch=False, min_lr, warmup='linear') for one group.

    regular = min_lr + (base − min_lr)·(1 + cos(π·step/total))/2 (``annealing_cos``); during warmup
    ``get_warmup_lr``: k = (1 − step/warmup)·(1 − warmup_ratio), lr = regular·(1 − k).
    """
    regular = min_lr + 0.5 * (group_base_lr - min_lr) * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if step < warmup_steps:
        k = (1 - step / warmup_steps) * (1 - warmup_start_ratio)
        return regular * (1 - k)
    return regular


def group_lrs(p: dict, step: int, total: int, warmup: int, ratios: list[float]) -> list[float]:
    """Each parameter group's lr at ``step`` under the preset's ``pretrain.schedule``."""
    if p["schedule"] == "mmcv":
        return [mmcv_lr(step, total, warmup, p["lr"] * r, p["min_lr"], p["warmup_start_ratio"]) for r in ratios]
    lr = lr_at(step, total, warmup, p["lr"], p["final_lr_ratio"], p["warmup_start_ratio"])
    return [lr * r for r in ratios]


def set_group_lrs(optimizer: torch.optim.Optimizer, lrs: list[float]) -> None:
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                   eta: float = 0.001, bias_lr_ratio: float = 0.024, lars_mode: str = "official") -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, bias_lr_ratio)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=eta, mode=lars_mode)
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
