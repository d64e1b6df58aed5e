"""Run a stage through submitit and block until it ends, streaming the job's output.

Executors (``launcher.executor``): ``local`` (submitit's LocalExecutor: a child process on this
machine, the laptop default), ``slurm`` (sbatch; multi-node, one task per device), ``inline``
(this very process: handy for debugging). The model, loss and optimizer know nothing of this:
only this module touches submitit or SLURM.

Failures are survivable at every level:
- timeout / preemption: the job is a ``submitit.helpers.Checkpointable``; SLURM signals it, submitit
  requeues it and the stage resumes from its last checkpoint;
- the launcher dies (login node reboot, Ctrl-C): the job id is recorded in ``<out_dir>/job.json``;
  the next launch finds the live job (``sacct``/``squeue``) and waits on it instead of submitting again;
- the job fails: the next launch submits a new one, which resumes from the checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import submitit

from barlow.atomic import write_json
from barlow.errors import BadInput

LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


class StageJob(submitit.helpers.Checkpointable):
    """A picklable stage call: ``barlow.<module>.<function>(*args, **kwargs)`` inside a job.

    On timeout or preemption submitit calls ``checkpoint`` (inherited), which requeues the same
    call; the stage itself resumes from the checkpoint files it writes.
    """

    def __init__(self, module: str, function: str, *args, **kwargs):
        self.module, self.function, self.args, self.kwargs = module, function, args, kwargs

    def __call__(self):
        import importlib
        import inspect

        from barlow import distributed
        from barlow.pretrain import env_threads

        env_threads()
        env = distributed.setup()
        print(f"rank {env.rank}/{env.world} on {os.uname().nodename} "
              f"(SLURMD_NODENAME={os.environ.get('SLURMD_NODENAME', '-')}, device {env.device})", flush=True)
        try:
            fn = getattr(importlib.import_module(self.module), self.function)
            extra = {"env": env} if "env" in inspect.signature(fn).parameters else {}
            return str(fn(*self.args, **self.kwargs, **extra))
        finally:
            distributed.teardown()

    def checkpoint(self, *args, **kwargs):
        print("checkpoint requested (timeout or preemption): requeueing; the stage resumes from its last checkpoint",
              flush=True)
        return super().checkpoint(*args, **kwargs)


def _executor(launcher: dict, folder: Path, name: str):
    kind = launcher.get("executor", "local")
    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise BadInput("launcher.executor slurm: sbatch not found on PATH; run on a SLURM login node "
                           "or set launcher.executor: local")
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    elif kind == "local":
        ex = submitit.AutoExecutor(folder=folder, cluster="local")
    else:
        raise BadInput(f"launcher.executor {kind!r}: unknown; use local, slurm or inline")
    params = dict(name=name, timeout_min=int(launcher.get("timeout_min", 60 * 24)),
                  nodes=int(launcher.get("nodes", 1)), tasks_per_node=int(launcher.get("tasks_per_node", 1)),
                  cpus_per_task=int(launcher.get("cpus_per_task", os.cpu_count() or 1)))
    if launcher.get("gpus_per_node"):
        params["gpus_per_node"] = int(launcher["gpus_per_node"])
    if launcher.get("mem_gb"):
        params["mem_gb"] = float(launcher["mem_gb"])
    if kind == "slurm":
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            if launcher.get(key):
                params[f"slurm_{key}"] = launcher[key]
        params["slurm_signal_delay_s"] = int(launcher.get("signal_delay_s", 120))
        if launcher.get("additional"):
            params["slurm_additional_parameters"] = dict(launcher["additional"])
    if kind == "local" and params["nodes"] > 1:
        raise BadInput("launcher.nodes > 1 needs launcher.executor: slurm (the local executor runs on one machine)")
    ex.update_parameters(**params)
    return ex


def _slurm_state(job_id: str) -> str:
    """State from sacct (squeue as fallback): '' when SLURM no longer knows the job."""
    for cmd in (["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], ["squeue", "-h", "-j", job_id, "-o", "%T"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0].split("+")[0].strip()
    return ""


def run(module: str, function: str, args: tuple, kwargs: dict, launcher: dict, out_dir: str | Path, name: str):
    """Run the stage, re-attaching to a live SLURM job of an earlier launch where there is one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    call = StageJob(module, function, *args, **kwargs)
    if launcher.get("executor", "local") == "inline":
        return call()
    record = out_dir / "job.json"
    folder = out_dir / "submitit"
    job = None
    if record.is_file() and launcher.get("executor") == "slurm":
        old = json.loads(record.read_text())
        state = _slurm_state(old["job_id"])
        if state in LIVE_STATES:
            print(f"re-attaching to SLURM job {old['job_id']} ({state}) from an earlier launch", flush=True)
            job = submitit.SlurmJob(folder=folder, job_id=old["job_id"], tasks=tuple(range(old.get("tasks", 1))))
        else:
            print(f"earlier job {old['job_id']} is {state or 'gone'}; submitting a new one (it resumes from the checkpoint)",
                  flush=True)
    if job is None:
        ex = _executor(launcher, folder, name)
        try:
            job = ex.submit(call)
        except subprocess.CalledProcessError as e:
            msg = (e.output or b"").decode(errors="replace").strip().splitlines() if isinstance(e.output, bytes) else str(e.output or e).splitlines()
            raise BadInput(f"sbatch refused the {name} job: {msg[-1] if msg else e}; check launcher.partition / "
                           "nodes / gpus_per_node / mem_gb against `sinfo`") from None
        except Exception as e:  # noqa: BLE001 - submitit wraps sbatch failures in several types
            first = str(e).strip().splitlines()
            raise BadInput(f"could not submit the {name} job: {first[-1] if first else type(e).__name__}; check "
                           "launcher.partition / nodes / gpus_per_node / mem_gb against `sinfo`") from None
        tasks = int(launcher.get("nodes", 1)) * int(launcher.get("tasks_per_node", 1))
        write_json(record, {"job_id": str(job.job_id), "executor": launcher.get("executor", "local"),
                            "tasks": tasks, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"submitted {name} as job {job.job_id} ({launcher.get('executor', 'local')}); "
              f"logs: {folder}", flush=True)
    return _wait(job, poll=float(launcher.get("poll_s", 2.0)))


def _wait(job, poll: float):
    """Block until the job ends, echoing new lines of rank 0's stdout and stderr as they come."""
    offsets = {"out": 0, "err": 0}

    def pump():
        for key, path in (("out", job.paths.stdout), ("err", job.paths.stderr)):
            try:
                with open(path, "r", errors="replace") as f:
                    f.seek(offsets[key])
                    chunk = f.read()
                    offsets[key] = f.tell()
            except FileNotFoundError:
                continue
            if chunk:
                (sys.stdout if key == "out" else sys.stderr).write(chunk)
                (sys.stdout if key == "out" else sys.stderr).flush()

    while not job.done():
        pump()
        time.sleep(poll)
    pump()
    try:
        return job.results()[0]  # rank 0's return value
    except submitit.core.utils.UncompletedJobError as e:
        raise RuntimeError(f"job {job.job_id} ended without a result ({str(e).splitlines()[0]}); "
                           f"see {job.paths.stderr}; rerun to resume from its checkpoint") from None
    except submitit.core.utils.FailedJobError as e:
        # Hand the stage's own one-line error back to the caller instead of a remote traceback.
        for kind in (BadInput, FloatingPointError):
            found = re.findall(rf"{kind.__module__}\.{kind.__name__}: (.*)|\b{kind.__name__}: (.*)", str(e))
            if found:
                raise kind("".join(found[-1])) from None
        raise RuntimeError(f"job {job.job_id} failed; its log: {job.paths.stderr}") from None
