"""The probe stage on the real cluster: ``scontrol requeue`` mid-probe (issue 11).

``python -m barlow probe --executor slurm`` on tiny real data with a random backbone; once the job
has written its resume checkpoint (progress, never a fixed sleep, decides when) it is held
(``scontrol suspend``, so that how fast this machine trains cannot let it finish first) and
requeued as it is resumed. The job must resume from the checkpoint (same job id, REQUEUED then COMPLETED) and end
with exactly the top-1 of an unbroken run of the same config (run inline beside it, with the
job's thread count).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO
from tests.test_probe import random_backbone

pytestmark = pytest.mark.slurm

STEPS = 18  # 384 images / 64 = 6 steps per epoch, 3 epochs
OVERRIDES = {"pretrain": {"init": "random"}, "probe": {"workers": 1, "checkpoint_every_steps": 1, "passes": [
    {"name": "aug", "cached": False, "heads": ["feature3", "avgpool"], "epochs": 3, "batch_size": 64,
     "optimizer": "adamw", "lr": 0.01, "schedule": "cosine", "augment": {"scale": [0.5, 1.0]}}]}}
PROBE_JOB = {"executor": "slurm", "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "timeout_min": 60,
             "mem_gb": 2, "poll_s": 0.5}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _checkpoint(out: Path) -> Path:
    from barlow import probe

    if hasattr(probe, "checkpoint_path"):
        return probe.checkpoint_path(out)
    return out.parent / probe.CHECKPOINT


def _job_id(out: Path) -> str | None:
    """The id the launcher recorded (job.json in its folder, wherever the CLI puts that folder)."""
    for record in out.parent.glob("**/job.json"):
        return json.loads(record.read_text())["job_id"]
    return None


def _probe_cmd(tmp_path: Path, fmnist: dict, backbone: Path, out: Path, launcher: dict) -> list[str]:
    return [sys.executable, "-m", "barlow", "probe", "--preset", "fmnist_r18", "--config", str(tmp_path / "over.yaml"),
            "--launcher-json", json.dumps(launcher), "--backbone", str(backbone), "--train", str(fmnist["train"]),
            "--val", str(fmnist["val"]), "--out", str(out)]


def test_requeue_mid_probe_resumes_to_the_unbroken_result(slurm_cluster, tmp_path, fmnist_tiny):
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(OVERRIDES))
    backbone = random_backbone(tmp_path / "backbone.pth")
    out, ref_out = tmp_path / "run" / "probes.json", tmp_path / "ref" / "probes.json"
    log, ref_log = tmp_path / "probe.txt", tmp_path / "reference.txt"
    ckpt = _checkpoint(out)
    with open(log, "w") as fh:
        proc = subprocess.Popen(_probe_cmd(tmp_path, fmnist_tiny, backbone, out, PROBE_JOB), stdout=fh,
                                stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    # the unbroken reference, in this machine's other core meanwhile: inline, with the job's 1 thread
    # (barlow.distributed.use_task_cpus reads SLURM_CPUS_PER_TASK)
    with open(ref_log, "w") as fh:
        ref = subprocess.Popen(_probe_cmd(tmp_path, fmnist_tiny, backbone, ref_out, {"executor": "inline"}),
                               stdout=fh, stderr=subprocess.STDOUT, env=_env(SLURM_CPUS_PER_TASK="1"), cwd=tmp_path)

    def explain() -> str:
        parts = [f"--- {f} ---\n{f.read_text(errors='replace')[-5000:]}" for f in (log, ref_log) if f.exists()]
        parts += [f"--- {f} ---\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(tmp_path.glob("run/**/*_log.*"))]
        job = _job_id(out)
        if job:
            parts.append(f"sacct {job}: {slurm_cluster.sacct_states(job)}")
        return "\n".join(parts + [slurm_cluster.logs()])

    job_id = None
    try:
        deadline = time.monotonic() + 180
        while not (ckpt.is_file() and _job_id(out)):
            if proc.poll() is not None:
                pytest.fail(f"the probe launcher exited ({proc.returncode}) before the first checkpoint\n{explain()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no probe checkpoint {ckpt} after 180 s\n{explain()}")
            time.sleep(0.1)
        job_id = _job_id(out)
        # hold the job where it is, so that it surely has steps left when the requeue comes
        sus = subprocess.run(["scontrol", "suspend", job_id], capture_output=True, text=True, timeout=30)
        assert sus.returncode == 0, f"{sus.stderr}\n{explain()}"
        step = torch.load(ckpt, map_location="cpu", weights_only=False)["step"]
        assert 1 <= step < STEPS and not out.exists(), f"step {step}\n{explain()}"
        # resumed and requeued at once (SLURM 22.05 requeues a suspended job but never starts it again)
        res = subprocess.run(["scontrol", "resume", job_id], capture_output=True, text=True, timeout=30)
        rq = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and rq.returncode == 0, f"{res.stderr}{rq.stderr}\n{explain()}"
        try:
            proc.wait(timeout=180)
            ref.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the probe still runs 180 s after the requeue\n{explain()}")
    except BaseException:  # leave nothing running behind a failure (a passing run ends by itself)
        for p in (proc, ref):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        if job_id:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
            subprocess.run(["scontrol", "resume", job_id], capture_output=True, timeout=30)
        raise
    assert proc.returncode == 0 and ref.returncode == 0, explain()
    assert slurm_cluster.wait_job(job_id, timeout=60) == "COMPLETED", explain()
    text = log.read_text()
    found = re.search(r"^resuming the probes from (\S+): pass 1/1, step (\d+)", text, flags=re.M)
    assert found and Path(found.group(1)) == ckpt and int(found.group(2)) >= step, text
    states = slurm_cluster.sacct_states(job_id)
    assert states[-1] == "COMPLETED" and "REQUEUED" in states[:-1], states
    assert _job_id(out) == job_id  # the same job ran on, not a new submission
    assert not ckpt.exists()  # deleted once probes.json is written
    resumed, unbroken = json.loads(out.read_text()), json.loads(ref_out.read_text())
    assert resumed["top1"] == unbroken["top1"], (resumed["top1"], unbroken["top1"])
    assert set(resumed["top1"]) == {"feature3", "avgpool"}
