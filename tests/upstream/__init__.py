"""The upstream oracles (see README.md): MMSelfSup 0.x / mmcv 1.x facts in mmselfsup_v0.py."""
from __future__ import annotations

import copy

from tests.upstream.mmselfsup_v0 import (CONFIGS, KAIMING_INIT_DEFAULTS, LARS, LINEAR_100E, MHEAD_90E,  # noqa: F401
                                         PRETRAIN_300E, LatentCrossCorrelationHead, mmcv_cosine_lr)


def mmcv_config(rel: str) -> dict:
    """A transcribed MMSelfSup config (its ``_base_`` files merged), see mmselfsup_v0.py."""
    return copy.deepcopy(CONFIGS[rel])


def mmselfsup_lars() -> type:
    return LARS


def latent_cross_correlation_head() -> type:
    return LatentCrossCorrelationHead


def mmcv_kaiming_init_defaults() -> dict:
    return dict(KAIMING_INIT_DEFAULTS)
