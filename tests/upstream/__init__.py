"""The upstream oracles (see README.md): MMSelfSup 0.x / mmcv 1.x facts in mmselfsup_v0.py, and helpers."""
from __future__ import annotations

import copy
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tests.upstream.mmselfsup_v0 import (CONFIGS, KAIMING_INIT_DEFAULTS, LARS, LINEAR_100E, MHEAD_90E,  # noqa: F401
                                         PRETRAIN_300E, LatentCrossCorrelationHead, mmcv_cosine_lr)

HERE = Path(__file__).parent


def _merge(base: dict, child: dict) -> dict:
    """mmcv.Config's rule: child dicts merge into base dicts key by key (``_delete_`` replaces)."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_delete_"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = {a: b for a, b in v.items() if a != "_delete_"} if isinstance(v, dict) else copy.deepcopy(v)
    return out


def mmcv_config(rel: str) -> dict:
    """A transcribed MMSelfSup config (its ``_base_`` files merged), see mmselfsup_v0.py."""
    return copy.deepcopy(CONFIGS[rel])


class _Registry:
    def register_module(self, *a, **k):
        return lambda cls: cls


def _exec_code(path: Path, replace: dict[str, str], names: dict) -> dict:
    src = path.read_text()
    for old, new in replace.items():
        assert old in src, f"{path}: expected import line {old!r} not found"
        src = src.replace(old, new)
    ns = dict(names)
    exec(compile(src, str(path), "exec"), ns)  # noqa: S102 - our vendored copy
    return ns


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mmselfsup_lars() -> type:
    return LARS


def latent_cross_correlation_head() -> type:
    return LatentCrossCorrelationHead


def mmcv_kaiming_init_defaults() -> dict:
    return dict(KAIMING_INIT_DEFAULTS)
