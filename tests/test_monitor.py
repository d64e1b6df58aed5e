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
from tests.ranks import run_ranks


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


def test_due_honours_every_steps_and_epoch_ends_only_when_asked():
    """imagenet_r50_ep300: 625 steps an epoch, every_steps 2500. Forcing every epoch end made it 300
    evaluations instead of 75 (issue 22: 15-25 % of pretraining instead of ~2 %)."""
    from types import SimpleNamespace

    due = [s for s in range(1, 187_501) if monitor.Monitor.due(SimpleNamespace(every=2500, at_epoch_end=False),
                                                               s, 625, 187_500)]
    assert len(due) == 75 and due[0] == 2500 and due[-1] == 187_500
    asked = SimpleNamespace(every=2500, at_epoch_end=True)
    assert monitor.Monitor.due(asked, 625, 625, 187_500) and not monitor.Monitor.due(asked, 626, 625, 187_500)
    assert monitor.Monitor.due(SimpleNamespace(every=2500, at_epoch_end=False), 7, 625, 7)  # the last step


def _sharded_evaluate(rank, world, port, train, out):
    import os

    import torch.distributed as dist

    from barlow.distributed import Env

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = BarlowTwins("resnet18", [64, 64], zero_init_residual=False)
        cfg = _cfg(monitor={"bank": 200, "queries": 101, "batch_size": 32})
        mon = monitor.Monitor(cfg, train, model.backbone, torch.device("cpu"), env=Env(rank, world))
        out[rank] = mon.evaluate()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_extraction_gives_the_one_process_values(fmnist_tiny):
    """Two ranks each extract half the bank and queries (101: uneven shards); rank 0's kNN and linear
    top-1 are the one-process ones, which only holds if every image is gathered back in its place."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    torch.manual_seed(0)
    model = BarlowTwins("resnet18", [64, 64], zero_init_residual=False)
    cfg = _cfg(monitor={"bank": 200, "queries": 101, "batch_size": 32})
    alone = monitor.Monitor(cfg, fmnist_tiny["train"], model.backbone, torch.device("cpu")).evaluate()
    with mp.Manager() as manager:
        out = manager.dict()
        run_ranks(_sharded_evaluate, 2, free_port(), fmnist_tiny["train"], out)
        got = dict(out)
    assert got[1] == {}
    for key in ("knn_k20", "knn_k200", "linear_top1"):
        assert got[0][key] == pytest.approx(alone[key], abs=1e-6), key


@pytest.mark.slow
def test_the_online_probe_trains_on_the_labels_of_its_own_images(fmnist_tiny, tmp_path, monkeypatch):
    """Under accumulation the head trains on the first micro-batch's features after the last one is
    read; FFCV has by then reused that batch's label buffer (5 slots), so the labels must be copied."""
    import barlow.pretrain as pretraining

    read, given = [], []
    split = pretraining.split_batch

    def spy_split(batch, views):
        out = split(batch, views)
        read.append(out[1].clone())
        return out

    end_step = monitor.Monitor.end_step
    monkeypatch.setattr(pretraining, "split_batch", spy_split)
    monkeypatch.setattr(monitor.Monitor, "end_step", lambda self, labels: (given.append(labels.clone()),
                                                                          end_step(self, labels))[1])
    cfg = _cfg(batch_size=128, accumulation=8, max_steps=2, monitor={"bank": 50, "queries": 20, "every_steps": 100})
    pretrain(cfg, fmnist_tiny["train"], tmp_path / "backbone.pth")
    assert len(given) == 2
    for step, labels in enumerate(given):
        assert torch.equal(labels, read[8 * step]), f"step {step}: the head got other images' labels"


@pytest.mark.slow
def test_bank_and_query_labels_are_the_files_labels(fmnist_tiny):
    """FFCV hands out labels in 5 reused buffers: kept uncopied, a bank of 7 batches held other images'
    labels (18 % of them on this file; every committed monitor curve before the fix was biased by it)."""
    torch.manual_seed(0)
    model = BarlowTwins("resnet18", [64, 64], zero_init_residual=False)
    mon = monitor.Monitor(_cfg(monitor={"bank": 200, "queries": 101, "batch_size": 32}), fmnist_tiny["train"],
                          model.backbone, torch.device("cpu"))
    truth = monitor.train_labels(fmnist_tiny["train"])
    for loader, n, idx in zip(mon.loaders, mon.sizes, monitor.subsets(len(truth), 200, 101)):
        _, labels = mon._features(loader, n)
        assert np.array_equal(labels.numpy(), truth[idx])
