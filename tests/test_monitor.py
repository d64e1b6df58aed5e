"""The online monitor (barlow/monitor.py): it changes nothing in training, its kNN is the kNN of the
backbone's features, the linear probe learns, and an untrained backbone gets its baseline row."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from barlow import config, monitor
from barlow.loader import make_loader, split_batch
from barlow.model import BarlowTwins
from barlow.pretrain import pretrain


def _cfg(**pretrain_overrides):
    cfg = config.resolve("fmnist_r18", {"pretrain": {"epochs": 1, "batch_size": 64, "workers": 1, "precision": "fp32",
                                                     "checkpoint_every_steps": 100, **pretrain_overrides}}, where="test")
    return cfg


def test_subsets_are_disjoint_fixed_and_fall_back_on_small_sets():
    bank, queries = monitor.subsets(100, 30, 20)
    assert len(bank) == 30 and len(queries) == 20 and not set(bank) & set(queries)
    assert list(bank) == sorted(bank)
    again = monitor.subsets(100, 30, 20)
    assert np.array_equal(bank, again[0]) and np.array_equal(queries, again[1])
    bank, queries = monitor.subsets(10, 30, 20)  # fewer images than asked: a quarter become queries
    assert (len(bank), len(queries)) == (8, 2) and not set(bank) & set(queries)


@pytest.mark.slow
def test_the_monitor_changes_no_weight(fmnist_tiny, tmp_path):
    """The same run with and without the monitor: bit-identical weights and losses."""
    runs = {}
    for on in (True, False):
        out = tmp_path / str(on) / "backbone.pth"
        pretrain(_cfg(monitor={"enabled": on, "every_steps": 2, "bank": 200, "queries": 100}), fmnist_tiny["train"], out)
        runs[on] = (torch.load(out, weights_only=False)["state_dict"], pd.read_csv(out.parent / "metrics.csv"))
    (w_on, m_on), (w_off, m_off) = runs[True], runs[False]
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_on)
    assert m_on["loss"].tolist() == m_off["loss"].tolist()
    assert m_on["knn_k20"].notna().sum() == 3 and m_off["knn_k20"].isna().all()  # steps 2, 4, 6 of 6


@pytest.mark.slow
def test_knn_and_linear_read_the_backbone(fmnist_tiny):
    """kNN top-1 recomputed here from features taken with torchvision's own forward (no hook, no
    BatchAugment): normalise the uint8 images by the preset's mean/std, one brute-force vote per query."""
    cfg = _cfg(monitor={"bank": 200, "queries": 100})
    torch.manual_seed(0)
    model = BarlowTwins("resnet18", [64, 64], zero_init_residual=False)
    mon = monitor.Monitor(cfg, fmnist_tiny["train"], model.backbone, torch.device("cpu"))
    got = mon.evaluate()
    assert model.backbone.training, "the backbone must be back in train mode"

    v1 = cfg["pretrain"]["augment"]["view1"]
    mean, std = torch.tensor(v1["mean"]).view(1, 3, 1, 1), torch.tensor(v1["std"]).view(1, 3, 1, 1)
    bank_idx, query_idx = monitor.subsets(384, 200, 100)
    model.backbone.eval()

    def feats(idx):
        xs, ys = [], []
        loader = make_loader(fmnist_tiny["train"], 50, train=False, workers=1, indices=idx, drop_last=False)
        for batch in loader:
            (x,), y = split_batch(batch, 1)
            with torch.no_grad():
                xs.append(model.backbone((x.float() / 255 - mean) / std))
            ys.append(y.long())
        return torch.cat(xs), torch.cat(ys)

    (b, by), (q, qy) = feats(bank_idx), feats(query_idx)
    b, q = F.normalize(b, dim=1), F.normalize(q, dim=1)
    correct = 0
    for i in range(len(q)):
        sims = [(float(q[i] @ b[j]), int(by[j])) for j in range(len(b))]
        votes = {}
        for s, c in sorted(sims, reverse=True)[:20]:
            votes[c] = votes.get(c, 0.0) + float(np.exp(s / 0.07))
        correct += max(votes, key=votes.get) == int(qy[i])
    assert got["knn_k20"] == pytest.approx(100 * correct / len(q), abs=1.01)  # one query of 100 may tie differently
    assert got["knn_k20"] > 40, "Fashion-MNIST kNN on a random ResNet is far above chance (10 %)"

    # the online linear probe learns from (detached) features and labels of training steps
    before = mon.evaluate()["linear_top1"]
    for batch in make_loader(fmnist_tiny["train"], 64, train=False, workers=1, drop_last=False):
        (x,), y = split_batch(batch, 1)
        for _ in range(10):
            mon.start_step()
            with torch.no_grad():
                model.backbone((x.float() / 255 - mean) / std)
            mon.end_step(y)
    after = mon.evaluate()["linear_top1"]
    assert after > before + 20, (before, after)
    mon.close()


@pytest.mark.slow
def test_an_untrained_backbone_writes_its_baseline_row(fmnist_tiny, tmp_path):
    cfg = config.resolve("fmnist_r18", {"pretrain": {"init": "random", "workers": 1, "monitor": {"bank": 200, "queries": 100}},
                                        "model": {"zero_init_residual": False}}, where="test")
    out = tmp_path / "random" / "backbone.pth"
    pretrain(cfg, fmnist_tiny["train"], out)
    m = pd.read_csv(out.parent / "metrics.csv")
    assert m["step"].tolist() == [0] and m["knn_k20"].iloc[0] > 40 and m["loss"].isna().all()
