"""The Barlow Twins loss, in two semantics: ``exact`` and ``as_trained``.

Both compute ``c = Σ_samples bn(z1)ᵀ bn(z2) / N`` over the global batch of N samples and

    loss = Σ_i (1 − c_ii)² + λ Σ_{i≠j} c_ij²

``exact`` standardises each embedding dimension over the *global* batch (BatchNorm1d without
affine, synced, as the official main.py) and back-propagates the exact gradient of that loss:
statistics and ``c`` are all-reduced with an autograd-aware reduction, so the result equals the
single-process full-batch computation on any backend (gloo included, where SyncBatchNorm does not run).

``as_trained`` is what produced the published MMSelfSup numbers (``LatentCrossCorrelationHead``):
each GPU standardises its own ``group`` samples (a plain, per-GPU ``BatchNorm1d``), and ``c`` is
summed over GPUs with the plain ``torch.distributed.all_reduce``, which autograd does not see: each
GPU back-propagates only its own share of ``c`` and DDP averages, so the recipe's gradient is the
exact gradient of this (per-group standardised) loss divided by its GPU count (= N / group). We
emulate that for *any* process layout: samples are standardised in consecutive groups of ``group``
global positions (rank-major: rank r holds positions r·n … r·n + n − 1), whichever rank or
accumulation micro-batch holds them, and ``grad_scale`` (1 / number of groups) is what the caller
multiplies the loss by before ``backward``. 4 GPUs × 512, 16 × 128 or one process with
accumulation then train the same function as the recipe's 8 × 256. (These positions are the loss's
own labelling of a step's samples, not the loader's, which deals them out strided: so which samples
share a group differs between layouts, as it differs between random orders; the loss does not.)

Example::

    >>> z1, z2 = torch.randn(256, 128), torch.randn(256, 128)
    >>> barlow_twins_loss(z1, z2, lambd=0.0051)
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients.

    Written here because ``torch.distributed.nn.functional.all_reduce`` (the same two lines) is
    deprecated in torch 2.14 and warns on every rank at every call.
    """

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _AllReduceReplicated(torch.autograd.Function):
    """Sum over ranks of a tensor from which every rank then computes the very same loss (``c``).

    The upstream gradient is then identical on every rank (the same function of the same sum), so
    the sum of the ranks' gradients, which ``_AllReduceSum`` would all-reduce (256 MB a step for
    ResNet-50's 8192 x 8192 ``c``), is ``world`` times the local one: the same gradient, no traffic.
    The statistics of ``standardise`` keep ``_AllReduceSum``: their gradients differ between ranks.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.world = dist.get_world_size()
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world


def _all_reduce_replicated(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceReplicated.apply(x) if _distributed() else x


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x) if _distributed() else x


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm1d(affine=False) in training mode, with statistics over the global batch."""
    n = _all_reduce(torch.tensor(float(z.shape[0]), device=z.device, dtype=z.dtype))
    mean = _all_reduce(z.sum(0)) / n
    var = _all_reduce(((z - mean) ** 2).sum(0)) / n  # biased, as BatchNorm normalises with
    return (z - mean) / torch.sqrt(var + eps)


def standardise_groups(z: torch.Tensor, group: int, offset: int, total: int, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm1d(affine=False) per group of ``group`` consecutive global positions.

    ``z`` holds positions ``offset … offset + len(z) − 1`` of a step of ``total`` samples; a group
    may lie inside this tensor, span several of them, or span ranks (its sums are all-reduced).
    """
    n_groups = total // group
    gid = (torch.arange(z.shape[0], device=z.device) + offset) // group
    count = z.new_zeros(n_groups).index_add_(0, gid, z.new_ones(z.shape[0]))
    sums = z.new_zeros(n_groups, z.shape[1]).index_add(0, gid, z)
    if _distributed():
        count = _all_reduce(count)
        sums = _all_reduce(sums)
    mean = (sums / count[:, None])[gid]
    centred = z - mean
    sq = z.new_zeros(n_groups, z.shape[1]).index_add(0, gid, centred**2)
    var = (_all_reduce(sq) / count[:, None])[gid]
    return centred / torch.sqrt(var + eps)


def _full(z: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings (AMP) are upcast: c sums thousands of products."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    z1, z2 = standardise(_full(z1)), standardise(_full(z2))
    n = _all_reduce(torch.tensor(float(z1.shape[0]), device=z1.device, dtype=z1.dtype))
    return _all_reduce_replicated(z1.T @ z2) / n


def _from_c(c: torch.Tensor, lambd: float) -> torch.Tensor:
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    return _from_c(cross_correlation(z1, z2), lambd)


def as_trained_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, group: int, offset: int,
                    total: int) -> tuple[torch.Tensor, float]:
    """(loss, grad_scale): the recipe's loss value, and 1 / its GPU count (see the module docstring).

    ``offset`` is the global position of ``z1[0]`` in the step, ``total`` the step's global batch.
    """
    if total % group:
        raise ValueError(f"global batch {total} is not a multiple of the loss group {group}")
    z1 = standardise_groups(_full(z1), group, offset, total)
    z2 = standardise_groups(_full(z2), group, offset, total)
    c = _all_reduce_replicated(z1.T @ z2) / total
    return _from_c(c, lambd), group / total


class Objective:
    """The configured loss for one optimizer step: ``(loss, grad_scale) = objective(z1, z2, offset, total)``."""

    def __init__(self, semantics: str = "exact", lambd: float = 0.0051, group: int | None = None):
        if semantics not in ("exact", "as_trained"):
            raise ValueError(f"pretrain.loss {semantics!r}: unknown; use exact or as_trained")
        if semantics == "as_trained" and not group:
            raise ValueError("pretrain.loss as_trained needs pretrain.loss_group (the recipe's per-GPU batch)")
        self.semantics, self.lambd, self.group = semantics, lambd, group

    def __call__(self, z1: torch.Tensor, z2: torch.Tensor, offset: int, total: int) -> tuple[torch.Tensor, float]:
        if self.semantics == "exact":
            return barlow_twins_loss(z1, z2, self.lambd), 1.0
        return as_trained_loss(z1, z2, self.lambd, self.group, offset, total)
