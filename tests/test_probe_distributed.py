"""Data-parallel probes: 2 real gloo processes give the heads and top-1 of 1 process.

Both protocols run: a cached pass and a backbone-every-epoch pass with the protocol's default
train augmentation (random resized crop 0.08-1 and flip), whose parameters each global batch draws
once and each rank takes at the positions FFCV gave it, so every image gets the view it gets in
one process. 383 train images make FFCV's distributed sampler pad the shards (192 + 191), and
64-image global batches become 32 per rank.
"""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

from barlow.config import resolve
from barlow.distributed import Env
from tests.test_probe import random_backbone
from tests.ranks import run_ranks


def config() -> dict:
    return resolve("fmnist_r18", {"pretrain": {"init": "random"}, "probe": {"limit_train": 383, "workers": 1, "passes": [
        {"name": "cached", "cached": True, "heads": ["feature1", "feature2", "feature3", "feature4", "feature5",
                                                      "avgpool"],
         "epochs": 2, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "milestones": [1]},
        {"name": "augmented", "cached": False, "heads": ["feature3", "avgpool"], "epochs": 1, "batch_size": 64,
         "optimizer": "adamw", "lr": 0.01}]}})  # the default augmentation: crop and flip


def run_capturing_heads(cfg, weights, data, out, env, heads: dict | None = None) -> tuple[dict, dict]:
    """run_probes, keeping each head's final weights in ``heads`` (captured where they are evaluated)."""
    from barlow import probe

    heads, correct = {} if heads is None else heads, probe.count_correct

    def capture(head, x, y, batch=2048):
        key = f"{len(heads)}"
        heads[key] = {k: v.detach().clone() for k, v in head.state_dict().items()}
        return correct(head, x, y, batch)

    probe.count_correct = capture
    try:
        summary = probe.run_probes(cfg, weights, data["train"], data["val"], out, env=env, log=lambda *a: None)
    finally:
        probe.count_correct = correct
    return summary, heads


def _rank(rank: int, world: int, port: int, cfg, weights, data, out_dir) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        summary, heads = run_capturing_heads(cfg, weights, data, f"{out_dir}/probes.json", Env(rank, world, rank, "cpu"))
        torch.save({"top1": summary["top1"], "heads": heads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~25 s on 2 cores: two spawned processes import torch and FFCV
def test_two_processes_train_the_heads_of_one(fmnist_tiny, tmp_path):
    cfg = config()
    weights = random_backbone(tmp_path / "backbone.pth")
    one, heads1 = run_capturing_heads(cfg, weights, fmnist_tiny, tmp_path / "one" / "probes.json", None)

    two = tmp_path / "two"
    two.mkdir()
    run_ranks(_rank, 2, free_port(), cfg, weights, fmnist_tiny, str(two))
    written = json.loads((two / "probes.json").read_text())
    assert written["top1"] == one["top1"]
    assert sorted(p.name for p in two.iterdir()) == ["probes.json", "rank0.pt", "rank1.pt"]  # no checkpoint left
    for rank in (0, 1):
        got = torch.load(two / f"rank{rank}.pt")
        assert got["top1"] == one["top1"]
        assert got["heads"].keys() == heads1.keys()
        for key, state in heads1.items():
            for name, value in state.items():
                if value.is_floating_point():
                    torch.testing.assert_close(got["heads"][key][name], value, atol=1e-5, rtol=1e-4,
                                               msg=f"head {key} {name} (rank {rank})")
                else:
                    assert torch.equal(got["heads"][key][name], value), (key, name)
    # The heads learned something (chance: 10%). The exception, the augmented pass's AvgPool head on
    # a random backbone, stays near chance after one epoch of 0.08-1 crops; its weights agree above.
    assert all(v > 10 for head, v in one["top1"].items() if head != "avgpool"), one["top1"]
