"""LARS and the schedule against straightforward reference implementations of the official formulas."""
import math

import torch

from barlow.model import BarlowTwins
from barlow.optim import LARS, lr_at, param_groups, set_lr
from barlow.reference_bt import ReferenceLARS  # main.py's per-parameter LARS, also the benchmark's peer


def _model(seed):
    torch.manual_seed(seed)
    return BarlowTwins("resnet18", [32, 32]).double()


def test_param_groups_exclude_every_vector_parameter():
    m = _model(0)
    weights, vectors = param_groups(m, 1e-6)
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in vectors["params"])
    assert vectors["weight_decay"] == 0 and not vectors["lars"] and vectors["lr_ratio"] == 0.024
    n_bn = sum(2 for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm))
    n_bias = sum(1 for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod.bias is not None)
    assert n_bias == 1  # [32, 32]: the first projector Linear has a bias, the last none (as published)
    assert len(vectors["params"]) == n_bn + n_bias  # every BN incl. downsample BN, and every bias


def test_lars_matches_reference_over_several_steps():
    a, b = _model(0), _model(0)
    ours = LARS(param_groups(a, 1e-6), lr=1.6, eta=0.001)
    ref_w = [p for p in b.parameters() if p.ndim > 1]
    ref_v = [p for p in b.parameters() if p.ndim == 1]
    ref = ReferenceLARS([{"params": ref_w}, {"params": ref_v}], lr=1.6, weight_decay=1e-6,
                        weight_decay_filter=True, lars_adaptation_filter=True)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    for step in range(3):
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
        set_lr(ours, 1.6 / (step + 1))
        ref.param_groups[0]["lr"] = 1.6 / (step + 1)
        ref.param_groups[1]["lr"] = 1.6 / (step + 1) * 0.024
        ours.step()
        ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)


def test_schedule_warmup_then_cosine_to_final_ratio():
    total, warm, base = 1000, 100, 1.6
    assert lr_at(0, total, warm, base) == 0.0
    assert math.isclose(lr_at(50, total, warm, base), 0.8)
    assert math.isclose(lr_at(100, total, warm, base), base)
    assert math.isclose(lr_at(total, total, warm, base, final_ratio=0.001), 0.0016)
    assert math.isclose(lr_at(0, total, warm, base, warmup_start_ratio=1e-4), 1.6e-4)
    lrs = [lr_at(s, total, warm, base) for s in range(warm, total)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))
