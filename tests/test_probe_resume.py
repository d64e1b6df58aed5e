"""Resumable probes: a run stopped after k optimizer steps and rerun ends with the heads of an unbroken run.

The stop is injected in-process: the optimizer step raises once a head has taken k steps (progress,
never time), leaving whatever checkpoint the run last wrote, as a kill would. Both protocols are
stopped mid-epoch: the cached pass (order drawn from a checkpointed generator) and the augmented
pass (FFCV order and per-batch augmentation seeds replayed from the epoch and batch index).
"""
import pytest
import torch

from barlow.config import resolve
from barlow.errors import BadInput
from tests.test_probe import random_backbone
from tests.test_probe_distributed import run_capturing_heads


class Stop(Exception):
    pass


def config(every: int = 2, lr: float = 0.05) -> dict:
    # 384 images / 64 = 6 steps per epoch, 2 epochs: a checkpoint after steps 2, 4, 6 (epoch end), 8, ...
    return resolve("fmnist_r18", {"pretrain": {"init": "random"}, "probe": {"workers": 1, "checkpoint_every_steps": every,
        "passes": [
            {"name": "cached", "cached": True, "heads": ["feature1", "feature2", "feature3", "feature4", "feature5",
                                                          "avgpool"],
             "epochs": 2, "batch_size": 64, "optimizer": "sgd", "lr": lr, "momentum": 0.9, "milestones": [1]},
            {"name": "augmented", "cached": False, "heads": ["feature3", "avgpool"], "epochs": 2, "batch_size": 64,
             "optimizer": "adamw", "lr": 0.01, "schedule": "cosine", "augment": {"scale": [0.5, 1.0]}}]}})


def stop_after(monkeypatch, steps: int) -> None:
    """Make the run raise Stop when any head is about to take its (steps + 1)-th step in this run."""
    from barlow import fit

    real, taken = fit.sgd_step, {}

    def step(t, *args, **kwargs):
        # Keyed by id but holding the trainer: a finished pass's freed trainer could otherwise lend its id
        # (and its count) to a new pass's, and the stop came early (CI run of stop 29: step 3, not 9).
        _, count = taken.get(id(t), (t, 0))
        taken[id(t)] = (t, count + 1)
        if count + 1 > steps:
            raise Stop
        return real(t, *args, **kwargs)

    monkeypatch.setattr(fit, "sgd_step", step)


def test_stopped_runs_resume_to_the_unbroken_result(fmnist_tiny, tmp_path, monkeypatch):
    weights = random_backbone(tmp_path / "backbone.pth")
    unbroken, heads_unbroken = run_capturing_heads(config(), weights, fmnist_tiny, tmp_path / "a" / "probes.json", None)

    out = tmp_path / "b" / "probes.json"
    ckpt = out.parent / "probes.checkpoint.pt"
    with monkeypatch.context() as m:
        stop_after(m, 9)  # cached pass: stops in epoch 2 after step 9; the checkpoint holds step 8
        with pytest.raises(Stop):
            run_capturing_heads(config(), weights, fmnist_tiny, out, None)
    assert torch.load(ckpt, weights_only=False)["step"] == 8 and not out.exists()

    with pytest.raises(BadInput, match=r"probes.checkpoint.pt: made with another probe config "
                                       r"\(probe.passes\[0\].lr: 0.05 -> 0.1\)"):
        run_capturing_heads(config(lr=0.1), weights, fmnist_tiny, out, None)

    cached_heads = {}
    with monkeypatch.context() as m:
        stop_after(m, 9)  # resumes the cached pass (4 steps), then stops the augmented pass after its step 9
        with pytest.raises(Stop):
            run_capturing_heads(config(every=3), weights, fmnist_tiny, out, None, cached_heads)  # cadence is free
    assert len(cached_heads) == 6
    for key, state in cached_heads.items():
        for name, value in state.items():
            assert torch.equal(value, heads_unbroken[key][name]), (key, name)
    state = torch.load(ckpt, weights_only=False)
    assert (state["pass"], state["step"]) == (1, 9) and set(state["results"]) == set(unbroken["top1"])

    resumed, heads_resumed = run_capturing_heads(config(), weights, fmnist_tiny, out, None)
    assert resumed["top1"] == unbroken["top1"]
    assert not ckpt.exists() and out.is_file()
    # heads of the resumed pass are captured in this run only; those of the finished pass are not
    assert len(heads_resumed) == 2
    for key, state in heads_resumed.items():
        ref = heads_unbroken[str(6 + int(key))]
        for name, value in state.items():
            assert torch.equal(value, ref[name]), (key, name)
