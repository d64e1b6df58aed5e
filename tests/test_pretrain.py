"""Pretraining on real (tiny) data: it learns, it resumes bit-exactly after SIGKILL, it stops on NaN."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import REPO, cli_in_process

pytestmark = pytest.mark.slow

# The monitor evaluates every 2 steps: its values must survive the kills as exactly as the weights.
TINY = {"pretrain": {"epochs": 2, "batch_size": 64, "checkpoint_every_steps": 1, "workers": 1, "precision": "fp32",
                     "monitor": {"every_steps": 2, "bank": 200, "queries": 100}}}
WATCHED = ["knn_k20", "knn_k200", "linear_top1"]
KILL_AFTER_STEPS = (2, 5, 9)  # of 12; the checkpoint after each step is then being written


def _start(cfg_file, train, out):
    # CUDA hidden: the bit-exact comparison below holds on the CPU (cuDNN kernels are not deterministic)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "barlow", "pretrain", "--config", str(cfg_file), "--train", str(train),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _config(tmp_path, overrides=TINY):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump(overrides))
    return f


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_kill_anywhere_then_resume_gives_identical_weights(fmnist_tiny, tmp_path):
    cfg = _config(tmp_path)
    ref = tmp_path / "unbroken" / "backbone.pth"
    p = _start(cfg, fmnist_tiny["train"], ref)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out

    broken = tmp_path / "broken" / "backbone.pth"
    metrics = broken.parent / "metrics.csv"
    kills = 0
    for kill_after in KILL_AFTER_STEPS:
        # Progress-triggered, not timed: kill as soon as this incarnation has logged step k. The
        # metrics row is written just before that step's checkpoint, so the kill usually lands
        # inside the checkpoint write (one is written after every step here).
        p = _start(cfg, fmnist_tiny["train"], broken)
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if metrics.is_file() and len(pd.read_csv(metrics)) >= kill_after:
                break
            time.sleep(0.02)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate(timeout=60)
    assert kills == len(KILL_AFTER_STEPS), "a run ended before its kill: the test proved less than it claims"
    p = _start(cfg, fmnist_tiny["train"], broken)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert "resuming from" in out
    a, b = _weights(ref), _weights(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill+resume"
    m = pd.read_csv(broken.parent / "metrics.csv")
    assert list(m["step"]) == list(range(1, len(m) + 1)), "metrics rows lost or repeated across resumes"
    unbroken = pd.read_csv(ref.parent / "metrics.csv")
    assert m[WATCHED].notna().sum().tolist() == [6, 6, 6], "the monitor did not evaluate at every 2nd step"
    pd.testing.assert_frame_equal(m[WATCHED + ["loss"]], unbroken[WATCHED + ["loss"]], check_exact=True)
    assert not list(broken.parent.glob(".*.tmp")), "a temporary file was left behind"
    # TensorBoard's curves across the 3 kills: every step once (purge_step drops what a killed incarnation
    # wrote after its last checkpoint), the very values of the unbroken run
    got, want = _scalars(broken.parent / "tb"), _scalars(ref.parent / "tb")
    assert len(list((broken.parent / "tb").glob("events.out.tfevents.*"))) == 1 + len(KILL_AFTER_STEPS)
    assert [s for s, _ in got["loss"]] == list(range(1, 13)), got["loss"]
    assert got["loss"] == want["loss"] and got["lr/group0"] == want["lr/group0"]
    assert [s for s, _ in got["monitor/knn_k20"]] == [2, 4, 6, 8, 10, 12]


def _scalars(log_dir) -> dict:
    """Every scalar tag of a run's event files, as TensorBoard reads them: [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_loss_decreases_and_metrics_are_logged(fmnist_tiny, tmp_path):
    cfg = _config(tmp_path, {"pretrain": {"epochs": 8, "batch_size": 64, "workers": 1, "lr": 0.004, "precision": "fp32"}})
    p = _start(cfg, fmnist_tiny["train"], tmp_path / "run" / "backbone.pth")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    m = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(m.columns) == ["step", "epoch", "loss", "lr", "samples_per_s", "elapsed_s", "knn_k20", "knn_k200",
                               "linear_top1", "monitor_s"]
    assert len(m) == 48 and m["lr"].max() > 0
    # Single steps are noisy at batch 64 on 384 images (+-10 %), so compare means; the run is
    # deterministic on the CPU in fp32 (see the resume test), whatever the CPU's bf16 support (measured
    # ratio, fp32: 0.916; the 0.95 bound still catches a trainer that does not learn: ~1.0).
    assert m["loss"].iloc[-16:].mean() < 0.95 * m["loss"].iloc[:8].mean(), m["loss"].round().tolist()


def _inline(cfg_file, train, out) -> subprocess.CompletedProcess:
    """``python -m barlow pretrain`` in this process (cli_in_process): for the runs that stop on an error, where a
    subprocess adds only its start-up."""
    return cli_in_process("pretrain", "--config", cfg_file, "--train", train, "--out", out)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(fmnist_tiny, tmp_path):
    cfg = _config(tmp_path, {"pretrain": {"epochs": 2, "batch_size": 64, "workers": 1, "optimizer": "sgd", "lr": 1.0e+30,
                                          "warmup_epochs": 0, "checkpoint_every_steps": 1}})
    out_path = tmp_path / "run" / "backbone.pth"
    r = _inline(cfg, fmnist_tiny["train"], out_path)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out
    line = out.strip().splitlines()[-1]
    assert line.startswith("error: loss is nan at step ") or line.startswith("error: loss is inf at step "), line
    step = int(line.split("at step ")[1].split()[0])
    ckpt = torch.load(out_path.parent / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == step  # the checkpoint is the last good step, before the bad one
    assert not out_path.exists()


def test_checkpoint_from_another_architecture_is_refused(fmnist_tiny, tmp_path):
    run = tmp_path / "run" / "backbone.pth"
    cfg = _config(tmp_path, {"pretrain": {"epochs": 1, "max_steps": 1, "batch_size": 64, "workers": 1}})
    r = _inline(cfg, fmnist_tiny["train"], run)
    assert r.returncode == 0, r.stderr[-3000:]
    run.unlink()
    cfg2 = _config(tmp_path, {"model": {"arch": "resnet34"}, "pretrain": {"epochs": 1, "max_steps": 1, "batch_size": 64}})
    r = _inline(cfg2, fmnist_tiny["train"], run)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "checkpoint is for 'resnet18', the config says 'resnet34'" in (r.stdout + r.stderr).strip().splitlines()[-1]
