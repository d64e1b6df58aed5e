"""The Barlow Twins loss, exact under data parallelism.

Each embedding is standardised per dimension over the *global* batch (BatchNorm1d without affine,
as published), the cross-correlation ``c = z1ᵀ z2 / N`` is summed over ranks, and

    loss = Σ_i (1 − c_ii)² + λ Σ_{i≠j} c_ij²

Statistics and ``c`` are all-reduced with ``torch.distributed.nn.functional.all_reduce``, which
passes gradients back through the reduction; a plain ``dist.all_reduce`` would not, and the
gradients would come out scaled by 1/world_size. Doing the standardisation here (instead of a
SyncBatchNorm layer) makes the result identical to the single-process full-batch computation on
any backend, gloo included, where SyncBatchNorm does not run.

Example::

    >>> z1, z2 = torch.randn(256, 128), torch.randn(256, 128)
    >>> barlow_twins_loss(z1, z2, lambd=0.0051)
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x)
    return x


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm1d(affine=False) in training mode, with statistics over the global batch."""
    n = _all_reduce(torch.tensor(float(z.shape[0]), device=z.device, dtype=z.dtype))
    mean = _all_reduce(z.sum(0)) / n
    var = _all_reduce(((z - mean) ** 2).sum(0)) / n  # biased, as BatchNorm normalises with
    return (z - mean) / torch.sqrt(var + eps)


def _full(z: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings (AMP) are upcast: c sums thousands of products."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    z1, z2 = standardise(_full(z1)), standardise(_full(z2))
    n = _all_reduce(torch.tensor(float(z1.shape[0]), device=z1.device, dtype=z1.dtype))
    return _all_reduce(z1.T @ z2) / n


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    c = cross_correlation(z1, z2)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag
