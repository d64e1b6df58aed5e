"""Weighted k-nearest-neighbour classifier on frozen features: the protocol of InstDisc (Wu et al.
2018), DINO's ``eval_knn.py`` and solo-learn's ``WeightedKNNClassifier``.

Features are L2-normalised, so the dot product is the cosine similarity; each of the k nearest
bank samples votes for its class with weight exp(similarity / T); the class with the largest
summed vote wins. Ties between classes go to the lowest class index (``argmax``). torch has no
such classifier (torchvision/timm neither), so it is written here: one matmul and a top-k per chunk.

``knn_record``: the probe stage's kNN column, from features sharded over several processes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from barlow.distributed import Env, gather_rows

TEMPERATURE = 0.07
KS = (20, 200)


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, k: int,
                temperature: float = TEMPERATURE, classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each row of ``query`` from its ``k`` nearest rows of ``bank``.

    ``k`` larger than the bank uses the whole bank. Computed in float32 (a bf16 similarity would
    reorder near neighbours) in chunks of ``chunk`` queries to bound memory at chunk x bank.
    """
    return knn_predictions(bank, bank_labels, query, (k,), temperature, classes, chunk)[k]


def knn_predictions(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, ks=KS,
                    temperature: float = TEMPERATURE, classes: int | None = None,
                    chunk: int = 1024) -> dict[int, torch.Tensor]:
    """``knn_predict`` for several k at the cost of one: one similarity matrix and one (sorted)
    top-k for the largest k per chunk, whose first k columns are the k nearest."""
    if bank.shape[0] == 0:
        raise ValueError("kNN: the feature bank is empty")
    classes = classes or int(bank_labels.max()) + 1
    bank = F.normalize(bank.float(), dim=1)
    labels = bank_labels.long()
    k_max = min(max(ks), bank.shape[0])
    out: dict[int, list] = {k: [] for k in ks}
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k_max, dim=1)
        weight, near = (sim / temperature).exp(), labels[idx]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(q.shape[0], classes, device=q.device)
            votes.scatter_add_(1, near[:, :kk], weight[:, :kk])
            out[k].append(votes.argmax(dim=1))
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in out.items()}


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
             ks=KS, temperature: float = TEMPERATURE) -> dict[int, float]:
    """Top-1 accuracy (%) of the weighted kNN classifier for each k in ``ks``."""
    classes = int(torch.cat([bank_labels, query_labels]).max()) + 1
    n = max(1, query.shape[0])
    preds = knn_predictions(bank, bank_labels, query, tuple(ks), temperature, classes)
    return {k: round(100.0 * float((preds[k] == query_labels.long()).sum()) / n, 2) for k in ks}


def knn_record(bank, bank_y, query, query_y, n_bank: int, n_query: int, env: Env, device) -> dict:
    """Weighted kNN top-1 of ``query`` (val) against ``bank`` (train), given this rank's shards of each.

    Every rank gathers all shards and computes the same numbers (no broadcast needed), on the
    compute device: ImageNet's 1.28M x 2048 float16 bank takes ~5 GB there, ~16 GB with the float32
    copy knn_predict normalises.
    """
    if device.type == "meta":  # no numbers to classify (the device test)
        top1 = {k: float("nan") for k in KS}
    else:
        gather = gather_rows
        bank, bank_y = gather(bank.flatten(1), n_bank, env, device), gather(bank_y, n_bank, env, device)
        query, query_y = gather(query.flatten(1), n_query, env, device), gather(query_y, n_query, env, device)
        top1 = knn_top1(bank.to(device), bank_y.to(device), query.to(device), query_y.to(device))
    return {"features": "avgpool", "k": KS[0], "top1": top1[KS[0]], f"top1_k{KS[1]}": top1[KS[1]],
            "temperature": TEMPERATURE, "bank": n_bank, "queries": n_query}
