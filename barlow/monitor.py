"""Watch pretraining learn: an online kNN and an online linear probe on AvgPool features.

Every ``pretrain.monitor.every_steps`` optimizer steps and at the last step (at epoch ends too only
with ``at_epoch_end: true``: ImageNet's 625-step epochs would otherwise force 300 evaluations however
large ``every_steps`` is), the backbone's AvgPool features (eval mode, no augmentation, no gradient)
of two fixed images sets of the train split are extracted, drawn once with a fixed seed (the same
sets for every experiment and seed, so curves compare):

- the *bank*: ``bank`` images with their labels;
- the *queries*: ``queries`` other images, disjoint from the bank.

With several ranks each extracts a strided 1/world of both sets and rank 0 gathers them (the
other ranks would otherwise wait idle in their next collective while rank 0 alone extracts);
kNN top-1 (k = 20 and 200, cosine, exp(sim / 0.07) votes: barlow.knn) then classifies the queries
from the bank on rank 0's device. The queries come from the train split, not val, because the pretraining rule must not
gain the val file as an input: Snakemake reruns a job whose set of input files changed, and a
monitor must never retrain a finished run. Pretraining never sees a label, so labelled train
images held out of the bank measure the same thing; the probe stage's kNN column (full train bank,
full val split) is the held-out number.

The online linear probe (solo-learn, FFCV-SSL), on rank 0 only, is a BatchNorm1d(affine=False) + Linear head that
trains alongside, one AdamW step per optimizer step, on the *detached* AvgPool features of the
step's first view (captured by a forward hook: no extra forward) and their labels; its top-1 is
measured on the queries at each evaluation.

Nothing here changes training: no gradient reaches the backbone, its BatchNorm statistics are
untouched (eval mode, then train mode again), the global RNG is not drawn from (own generator),
and the data order is FFCV's (seed, epoch) order of the training loader, which the monitor's own
sequential loaders do not touch. Its state (head, optimizer) is saved in the checkpoint, so a
resumed run logs the very values of an unbroken one (tests/test_monitor.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from barlow.distributed import Env, gather_rows
from barlow.knn import knn_top1
from barlow.loader import close_iterator, make_loader, split_batch

COLUMNS = ["knn_k20", "knn_k200", "linear_top1", "monitor_s"]
SUBSET_SEED = 0  # one bank and one query set for every experiment and seed: the curves compare


def train_labels(path: str | Path) -> np.ndarray:
    """Labels of a .beton from its metadata table (no image is decoded)."""
    from barlow.ffcv_import import import_ffcv

    import_ffcv()
    from ffcv.reader import Reader

    r = Reader(str(path))
    return np.asarray(r.metadata[f"f{r.field_names.index('label')}"]).astype(np.int64)


def subsets(n: int, bank: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint bank and query indices (sorted: the loaders read in file order). With fewer than
    bank + queries images, a quarter of them (at least one) are queries."""
    order = np.random.default_rng(SUBSET_SEED).permutation(n)
    if bank + queries > n:
        queries = max(1, n // 4)
        bank = n - queries
    return np.sort(order[:bank]), np.sort(order[bank:bank + queries])


class Monitor:
    """Online kNN + linear monitor of one pretraining run (rank 0 only)."""

    def __init__(self, cfg: dict, train: str | Path, backbone: nn.Module, device: torch.device, amp_dtype=None,
                 memory_format=torch.contiguous_format, env: Env | None = None):
        from barlow.augment import BatchAugment, views_from_config
        from barlow.features import eval_view

        s = cfg["pretrain"]["monitor"]
        self.every, self.at_epoch_end = s["every_steps"], s["at_epoch_end"]
        self.env = env or Env()
        self.backbone, self.device, self.amp_dtype, self.memory_format = backbone, device, amp_dtype, memory_format
        labels = train_labels(train)
        self.classes = int(labels.max()) + 1
        bank_idx, query_idx = subsets(len(labels), s["bank"], s["queries"])
        self.sizes = (len(bank_idx), len(query_idx))
        rank, world = self.env.rank, self.env.world
        bank_idx, query_idx = bank_idx[rank::world], query_idx[rank::world]  # this rank's strided shard
        size = cfg["data"]["image_size"]
        v1 = views_from_config(cfg)[0]  # normalised as pretraining's views
        self.aug = BatchAugment(eval_view(size, {}, v1.mean, v1.std)).to(device)
        decode = "simple" if cfg["pretrain"]["decode"] == "simple" else "center"
        workers = cfg["pretrain"]["workers"]
        self.loaders = [make_loader(train, s["batch_size"], train=False, workers=workers, decode=decode, size=size,
                                    indices=idx, drop_last=False) for idx in (bank_idx, query_idx)]
        dim = _feature_dim(backbone)
        gen = torch.Generator().manual_seed(SUBSET_SEED)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, self.classes))
        with torch.no_grad():
            self.head[1].weight.copy_(torch.randn(self.head[1].weight.shape, generator=gen) * 0.01)
            self.head[1].bias.zero_()
        self.head.to(device)
        self.linear_lr, self._opt = s["linear_lr"], None
        self._captured: list[torch.Tensor] = []
        self._capturing = False
        # the online head trains on rank 0's first view only (one head, as a single process has)
        self._hook = backbone.register_forward_hook(self._capture) if self.env.main else None

    @property
    def opt(self) -> torch.optim.Optimizer:
        # built when first used: constructing a torch optimizer imports torch._dynamo (~1 s, torch 2.14's
        # Optimizer.add_param_group), which a random-init backbone's stage, whose monitor only evaluates, never needs
        if self._opt is None:
            self._opt = torch.optim.AdamW(self.head.parameters(), lr=self.linear_lr, weight_decay=0.0)
        return self._opt

    def _capture(self, module, inputs, output) -> None:
        if self._capturing and not self._captured:
            self._captured.append(output.detach())

    def start_step(self) -> None:
        """Capture the next backbone output (the step's first view) for the linear probe."""
        self._captured.clear()
        self._capturing = True

    def end_step(self, labels: torch.Tensor) -> None:
        """One step of the online linear probe on the captured features."""
        self._capturing = False
        if not self._captured:
            return
        x = self._captured.pop().float()
        y = labels[: x.shape[0]].to(x.device).long()
        self.head.train()
        loss = nn.functional.cross_entropy(self.head(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def due(self, step: int, steps_per_epoch: int, total: int) -> bool:
        """Whether ``evaluate`` runs after optimizer step ``step`` (the same answer on every rank)."""
        from barlow import monitor_schedule  # (the rule barlow.estimate counts by)

        return monitor_schedule.due(step, total, monitor_schedule.periods(self.every, steps_per_epoch,
                                                                          self.at_epoch_end))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every rank calls it (the extraction is sharded); rank 0 returns the values, the others ``{}``."""
        t0 = time.time()
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            (bank, bank_y), (query, query_y) = (self._features(loader, n) for loader, n in zip(self.loaders, self.sizes))
        finally:
            self.backbone.train(was_training)
        if not self.env.main:
            return {}
        knn = knn_top1(bank, bank_y, query, query_y, ks=(20, 200))
        self.head.eval()
        pred = self.head(query).argmax(1)
        linear = round(100.0 * float((pred == query_y).sum()) / max(1, len(query_y)), 2)
        return {"knn_k20": knn[20], "knn_k200": knn[200], "linear_top1": linear,
                "monitor_s": round(time.time() - t0, 2)}

    def _features(self, loader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``n`` images' features and labels (this rank's shard gathered with the others'), on the device."""
        feats, labels = [], []
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        it = iter(loader)
        try:
            for batch in it:
                (x,), y = split_batch(batch, 1)
                x = self.aug(x.to(self.device)).contiguous(memory_format=self.memory_format)
                with autocast:
                    feats.append(self.backbone(x).float())
                labels.append(y.to(self.device).long().flatten().clone())  # FFCV reuses its buffers
        finally:
            close_iterator(it)
        dim = _feature_dim(self.backbone)
        feats = torch.cat(feats) if feats else torch.empty(0, dim, device=self.device)  # (a rank may get no image)
        labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=self.device)
        return gather_rows(feats, n, self.env, self.device), gather_rows(labels, n, self.env, self.device)

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.head.load_state_dict(state["head"])
            self.opt.load_state_dict(state["optimizer"])

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()


def _feature_dim(backbone: nn.Module) -> int:
    from barlow.model import level_channels

    return level_channels(backbone)[-1]
