"""benchmarks/gpu_smoke.py: the GPU smoke check's CPU dry run end to end, its refusal without a GPU,
and the config it derives from the presets. (Its CUDA paths need a GPU: not checked here.)"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks import gpu_smoke
from tests.conftest import REPO

CUDA_ONLY = {"ffcv_to_device", "pretrain_amp_fp16", "pretrain_amp_bf16", "syncbn"}
DRY_RUN = ["--device", "cpu", "--quick", "--arch", "resnet18", "--image-size", "32", "--projector", "256,256,256",
           "--steps", "2", "--images", "64", "--workers", "1"]


def run(*args: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def committed_state():
    p = gpu_smoke.COMMITTED
    return p.stat().st_mtime_ns if p.exists() else None


def test_without_a_gpu_it_stops_with_one_line_naming_the_cpu_dry_run():
    before = committed_state()
    r = run(CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU found" in lines[0] and "--device cpu" in lines[0], r.stderr
    assert r.stdout == "" and committed_state() == before


def test_the_cpu_dry_run_never_writes_the_committed_gpu_record():
    r = run("--device", "cpu", "--out", str(gpu_smoke.COMMITTED))
    assert r.returncode == 2 and "GPU figures only" in r.stderr, r.stderr[-2000:]


def test_config_keeps_the_preset_and_takes_the_benchmark_sizes(tmp_path):
    args = gpu_smoke.parse(["--batch", "256"])
    ctx = gpu_smoke.Ctx(args, "cuda:0", tmp_path)
    cfg = gpu_smoke.experiment(ctx, gpu_smoke.ACCU4)
    p = cfg["pretrain"]
    assert (p["batch_size"], p["accumulation"], p["max_steps"]) == (256, 4, 20)
    assert p["loss_group"] == 256 // 8 and "limit_train" not in p  # the recipe's 8 as-trained groups
    assert (p["precision"], p["channels_last"], p["decode"]) == ("fp32", True, "rrc")
    assert cfg["model"]["arch"] == "resnet50" and cfg["model"]["sync_bn"] and cfg["probe"]["pooling"] == "published"
    assert all(ps["batch_size"] == 256 and ps["epochs"] == 1 for ps in cfg["probe"]["passes"])
    small = gpu_smoke.experiment(gpu_smoke.Ctx(gpu_smoke.parse(DRY_RUN), "cpu", tmp_path), gpu_smoke.PRETRAIN)
    assert small["probe"]["pooling"] == "auto" and small["pretrain"]["augment"]["view2"]["size"] == 32


def test_images_per_s_leaves_the_warmup_steps_out():
    rows = [{"samples_per_s": v, "elapsed_s": t} for v, t in ((1.0, 10.0), (100.0, 11.0), (90.0, 12.0), (110.0, 13.0))]
    r = gpu_smoke.rates(rows, batch=100, warmup=1)
    assert r["images_per_s"] == 100.0 and r["wall_images_per_s"] == pytest.approx(100.0)
    assert r["measured_steps"] == 3


@pytest.mark.slow  # ~50 s on 2 cores: every check on the CPU, two of them in 2 spawned processes
def test_the_cpu_dry_run_passes_every_check_and_skips_the_cuda_ones(tmp_path):
    before = committed_state()
    out, work = tmp_path / "gpu_smoke.json", tmp_path / "work"
    r = run(*DRY_RUN, "--out", str(out), "--work", str(work), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    status = dict((name, st) for st, name in re.findall(r"^\[(PASS|FAIL|SKIP)\] (\w+):", r.stdout, re.M))
    assert set(status) == set(gpu_smoke.CHECKS), status
    assert {n for n, s in status.items() if s == "SKIP"} == CUDA_ONLY, status
    assert all(s == "PASS" for n, s in status.items() if n not in CUDA_ONLY), status
    rec = json.loads(out.read_text())
    assert rec["complete"] and rec["passed"] and rec["device"] == "cpu" and rec["gpu"] is None
    assert rec["commit"] and rec["host"] and rec["torch"]
    for name in ("loader", "pretrain_fp32", "pretrain_accu4", "probe_published", "probe_single_pass", "ddp"):
        assert rec["checks"][name]["images_per_s"] > 0, name
    for name in ("probe_published", "probe_single_pass"):
        assert all(0 <= v <= 100 for v in rec["checks"][name]["top1"].values())
    assert rec["checks"]["ddp"]["backend"] == "gloo" and not rec["checks"]["ddp"]["sync_bn"]
    assert not work.exists()  # the scratch dir is removed without --keep
    assert committed_state() == before
    assert "Exception ignored" not in r.stderr
