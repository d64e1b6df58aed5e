"""GPU check: the ImageNet presets' CUDA paths through the real launch path, images/s per stage, <= 8 min.

    python -m benchmarks.gpu_smoke --out DIR        # on a CUDA machine (one GPU is enough)
    python -m benchmarks.gpu_smoke --dry-run        # the same checks on the CPU at the smallest sizes
    python -m benchmarks.gpu_smoke --plan           # what it would run (JSON: estimates, timeouts, experiments)

Every stage runs the project's own code (barlow.pretrain.pretrain, barlow.probe.run_probes and
merge_passes) through barlow.launch.run with submitit's local executor: each task goes through
StageJob and distributed.setup() as on a cluster. The 2-task checks put two tasks on ONE GPU (each
narrowed to it as cuda:0, so the task with LOCAL_RANK 1 computes on device 0) over gloo
(BARLOW_DIST_BACKEND=gloo; NCCL refuses two ranks on one GPU).

Checks, in order: env (torch / CUDA / GPU: the provenance), data (class folder of odd image modes ->
.beton, proportion, max side 500), loader (FFCV two-view rrc decoding to the GPU), pretrain_resume
(imagenet_r50_ep300 as it is: ResNet-50 at 224 px, projector 8192-8192-8192, fp32, channels_last,
SyncBN, monitor; 2 tasks; SIGKILLed once its step-4 checkpoint exists, relaunched, resumed from it on
the GPU, finished at step 8), pretrain_amp_bf16 and pretrain_amp_fp16 (1 task; GradScaler),
pretrain_accu4 (imagenet_r50_ep300_accu4, gradient caching, 2 tasks), pretrain_nccl (2 GPUs or more
only: NCCL + SyncBN), probe_cached (the fast cached single pass, 2 tasks) and probe_published (the
two augmented passes, one job each, 2 tasks, merged).

Each check runs in its own process (python -m benchmarks.gpu_smoke_checks) with its own timeout: a
check that hangs is killed with the tasks it started and reported as TIMEOUT by name (the Python
stacks at the kill are in DIR/logs/<check>.log and the tasks' submitit logs), and the next check
runs. DIR gets gpu_smoke.json (figures + provenance: commit, host, GPU, torch/CUDA, time; rewritten
after every check) and logs/; the scratch data and runs (1.4 GB ResNet-50 checkpoints) go to --work
(default: a temp dir, removed at the end unless --keep). Exit status: 0 if no check failed or timed
out, 1 otherwise, 2 when there is no GPU (without --dry-run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.gpu_smoke_checks import DRY, GPU, REPO, Sizes

CHECKS_MODULE = "benchmarks.gpu_smoke_checks"


@dataclasses.dataclass(frozen=True)
class Check:
    """One check: ``target`` ("module:function", run in its own process) with its estimate and timeout."""

    name: str
    target: str
    gpu_s: float             # seconds measured on one H200 (benchmarks/gpu_h200/: 2026-12-04, torch 2.11)
    dry_s: float             # measured seconds of the CPU dry run on the 2-core reference machine
    what: str
    needs: tuple[str, ...] = ("data",)
    timeout_s: float | None = None  # default: timeout_for()


def _c(name: str, gpu_s: float, dry_s: float, what: str, needs=("data",)) -> Check:
    return Check(name, f"{CHECKS_MODULE}:check_{name}", gpu_s, dry_s, what, needs)


# GPU figures: each check's seconds on one H200 with 16 cores, rounded up (benchmarks/gpu_h200/, 2026-12-04:
# the passes of two runs, 470 s together). The 2-task checks share one GPU over gloo, which moves the 8192-wide projector's
# gradients through host memory: pretrain_resume took 180 s against a 95 s guess. pretrain_nccl: never run (1 GPU).
CHECKS = [
    _c("env", 6, 3, "torch, CUDA, cuDNN, GPU name and count (provenance); CUDA starts here, not in the harness", ()),
    _c("data", 19, 6, "class folder of odd image modes -> train/val .beton (proportion, max side 500, quality 90)", ()),
    _c("loader", 17, 7, "FFCV two-view rrc decoding to the task's device (ToDevice on a GPU), 1 task"),
    _c("pretrain_resume", 181, 28, "imagenet_r50_ep300 as it is (fp32, channels_last, SyncBN, monitor), 2 tasks on one "
       "GPU over gloo: SIGKILLed once its first checkpoint exists, relaunched, resumed from it, every step once"),
    _c("pretrain_amp_bf16", 43, 13, "the same in amp_bf16, 1 task"),
    _c("pretrain_amp_fp16", 50, 17, "the same in amp_fp16 with the GradScaler, 1 task"),
    _c("pretrain_accu4", 64, 18, "imagenet_r50_ep300_accu4: gradient caching over 4 micro-batches, DDP no_sync, "
       "2 tasks"),
    _c("pretrain_nccl", 50, 0, "2 GPUs or more only: 2 tasks on 2 GPUs, nccl + SyncBatchNorm (SKIP on one GPU)"),
    _c("probe_cached", 33, 15, "the fast cached single pass (all six heads on features extracted once), 2 tasks"),
    _c("probe_published", 63, 26, "the published protocol: five_feature + avgpool, augmented, one job each, "
       "2 tasks, merged into probes.json"),
]
TARGET_S = 8 * 60


def planned_s(check: Check, dry_run: bool, gpus: int) -> float:
    if check.name == "pretrain_nccl" and (dry_run or gpus < 2):
        return 0.0  # SKIP
    return check.dry_s if dry_run else check.gpu_s


def timeout_for(check: Check, dry_run: bool, scale: float = 1.0) -> float:
    if check.timeout_s is not None:
        return check.timeout_s * scale
    # a hang, not a slow run: 2.5x the estimate (dry run: the shared 2-core machine varies more)
    base = max(90.0, 6 * check.dry_s) if dry_run else max(60.0, 2.5 * check.gpu_s)
    return base * scale


# --------------------------------------------------------------------------- one check, one process

def _no_core_dumps() -> None:
    # the timeout sends SIGABRT (Python's faulthandler then prints every thread's stack): no core files
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_one(check: Check, ctx_path: Path, work: Path, logs: Path, timeout_s: float, echo: bool = True) -> dict:
    """Run ``check`` in its own session; kill the whole session after ``timeout_s``."""
    results = work / ".results"
    results.mkdir(parents=True, exist_ok=True)
    result_path, log_path = results / f"{check.name}.json", logs / f"{check.name}.log"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", CHECKS_MODULE, check.name, check.target, str(ctx_path), str(result_path)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True, preexec_fn=_no_core_dumps)

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.write(f"  {check.name} | {line}")
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_session(proc)
        reader.join(timeout=10)
        seconds = time.perf_counter() - t0
        if timed_out:
            log.write(f"\n---- gpu_smoke: {check.name} timed out after {timeout_s:.0f} s: killed ----\n")
            log.write(_task_stacks(work / check.name))
    if timed_out:
        res = {"status": "TIMEOUT", "note": f"no result after {timeout_s:.0f} s: killed with the processes it started "
                                            f"(Python stacks at the kill: {log_path})"}
    elif result_path.is_file():
        res = json.loads(result_path.read_text())
    else:
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        res = {"status": "FAIL", "note": f"exit status {proc.returncode} without a result: {tail[0] if tail else ''}"}
    return {**res, "seconds": round(seconds, 1), "timeout_s": round(timeout_s), "log": str(log_path), "pid": proc.pid}


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGABRT (faulthandler prints each Python thread's stack), then SIGKILL, to the check's whole session:
    the check, the submitit controller and its tasks (none of them starts a session of its own)."""
    for sig, grace in ((signal.SIGABRT, 3.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(grace)
    proc.wait()


def _task_stacks(check_dir: Path, lines: int = 40) -> str:
    """The tail of every submitit task's stderr under the check's runs (where their stacks went)."""
    out = []
    for f in sorted(check_dir.rglob("*_log.err")) if check_dir.is_dir() else []:
        tail = f.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"---- {f} (last {len(tail)} lines) ----\n" + "\n".join(tail) + "\n")
    return "".join(out)


# --------------------------------------------------------------------------- the run

def source_sha256() -> str:
    """sha256 of the code that ran (barlow/ and benchmarks/ .py and .yaml files, by path): names the code
    where the copy has no .git (commit "unknown"), and a dirty tree exactly."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for d in ("barlow", "benchmarks") for p in (REPO / d).rglob("*")
                    if p.suffix in (".py", ".yaml") and p.is_file()):
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def provenance(env: dict, argv: list[str], started: float) -> dict:
    from barlow.provenance import git_commit

    keys = ("gpu", "gpu_count", "gpus", "gpu_memory_gib", "capability", "driver", "torch", "cuda", "cudnn", "python",
            "cuda_visible_devices")
    return {"commit": git_commit(), "source_sha256": source_sha256(), "host": socket.gethostname(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            **{k: env.get(k) for k in keys}, "cpus": os.cpu_count(),
            "argv": "python -m benchmarks.gpu_smoke " + " ".join(argv)}


def write_record(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


def fmt_rate(r: dict) -> str:
    v = r.get("images_per_s")
    return f"{v:,.0f}" if isinstance(v, (int, float)) else "-"


def plan_text(checks: list[Check], dry_run: bool, gpus: int, scale: float) -> str:
    est = {c.name: planned_s(c, dry_run, gpus) for c in checks}
    total = sum(est.values()) or 1.0
    where = "CPU dry run (smallest sizes; seconds measured on the 2-core reference machine)" if dry_run else \
        "one H200 (seconds measured there once, 2026-12-04: benchmarks/gpu_h200/)"
    lines = [f"plan, {where}:", f"  {'check':18s} {'est s':>6s} {'share':>6s} {'timeout':>8s}  what"]
    for c in checks:
        lines.append(f"  {c.name:18s} {est[c.name]:6.0f} {100 * est[c.name] / total:5.0f}% "
                     f"{timeout_for(c, dry_run, scale):7.0f}s  {c.what}")
    lines.append(f"  {'total':18s} {total:6.0f}   100%" + ("" if dry_run else
                 f"           target <= {TARGET_S} s ({'within' if total <= TARGET_S else 'OVER'})"))
    return "\n".join(lines)


def plan(checks: list[Check], dry_run: bool, sizes: Sizes, scale: float = 1.0) -> dict:
    """What a run would do, without running it (``--plan``): each check's estimate and timeout (a GPU run:
    for one GPU) and the experiments the pretraining checks resolve at these sizes. Imports no torch."""
    from benchmarks.gpu_smoke_checks import ACCU4, PRETRAIN, experiment

    gpus = 0 if dry_run else 1
    ctx = {"work": tempfile.gettempdir(), "dry_run": dry_run, "cpus": os.cpu_count() or 1, "env": {},
           "sizes": dataclasses.asdict(sizes)}
    rows = [{"name": c.name, "what": c.what, "planned_s": planned_s(c, dry_run, gpus),
             "timeout_s": timeout_for(c, dry_run, scale)} for c in checks]
    return {"mode": "dry_run (CPU)" if dry_run else "gpu", "gpus": gpus, "target_s": TARGET_S,
            "total_s": sum(r["planned_s"] for r in rows), "checks": rows, "sizes": dataclasses.asdict(sizes),
            "experiments": {PRETRAIN: experiment(ctx, PRETRAIN), ACCU4: experiment(ctx, ACCU4, batch=sizes.accu_batch)}}


def table(results: dict) -> str:
    lines = [f"{'check':18s} {'status':7s} {'s':>6s} {'est':>5s} {'images/s':>9s} {'wall':>8s}  note"]
    for name, r in results.items():
        wall = r.get("wall_images_per_s")
        lines.append(f"{name:18s} {r['status']:7s} {r.get('seconds', 0):6.1f} {r.get('estimate_s', 0):5.0f} "
                     f"{fmt_rate(r):>9s} {f'{wall:,.0f}' if wall else '-':>8s}  {r.get('note', '')}")
    return "\n".join(lines)


def run_checks(checks: list[Check], *, out: Path, work: Path, dry_run: bool, sizes: Sizes, argv: list[str],
               timeout_scale: float = 1.0, echo: bool = True) -> tuple[int, dict]:
    """Run ``checks`` in order (``env`` first when present), each in its own process; write
    ``out/gpu_smoke.json`` after each. Returns (exit status, record)."""
    started = time.time()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    record_path = out / "gpu_smoke.json"
    ctx = {"work": str(work), "dry_run": dry_run, "sizes": dataclasses.asdict(sizes), "cpus": os.cpu_count() or 1,
           "env": {}}
    ctx_path = work / "ctx.json"
    ctx_path.write_text(json.dumps(ctx, indent=2))
    results: dict = {}
    record = {"tool": "python -m benchmarks.gpu_smoke", "mode": "dry_run (CPU)" if dry_run else "gpu",
              "provenance": provenance({}, argv, started), "sizes": dataclasses.asdict(sizes), "complete": False,
              "passed": False, "checks": results}

    def save():
        record.update(wall_s=round(time.time() - started, 1), checks=results)
        write_record(record_path, record)

    for c in checks:
        gpus = ctx["env"].get("gpu_count", 0)
        blocked = [n for n in c.needs if results.get(n, {}).get("status") != "PASS"]
        print(f"\n== {c.name}: {c.what}", flush=True)
        if blocked:
            res = {"status": "SKIP", "note": f"needs {', '.join(blocked)}, which did not pass", "seconds": 0.0}
        else:
            res = run_one(c, ctx_path, work, logs, timeout_for(c, dry_run, timeout_scale), echo=echo)
        res["estimate_s"] = planned_s(c, dry_run, gpus)
        results[c.name] = res
        print(f"[{res['status']}] {c.name}: {res['seconds']:.1f} s (estimate {res['estimate_s']:.0f} s)  "
              f"{fmt_rate(res)} images/s  {res.get('note', '')}", flush=True)
        if c.name == "env" and res["status"] == "PASS":
            ctx["env"] = {k: v for k, v in res.items() if k not in ("status", "seconds", "log", "timeout_s")}
            ctx_path.write_text(json.dumps(ctx, indent=2))
            record["provenance"] = provenance(ctx["env"], argv, started)
            if not dry_run and not ctx["env"].get("cuda_available"):
                save()
                return 2, record
            print("\n" + plan_text(checks, dry_run, ctx["env"].get("gpu_count", 0), timeout_scale), flush=True)
            visible = ctx["env"].get("cuda_visible_devices")
            if not dry_run and visible and visible.split(",")[0].strip() != "0":
                print(f"warning: CUDA_VISIBLE_DEVICES={visible}: submitit's local executor gives its tasks "
                      "CUDA_VISIBLE_DEVICES=0 (barlow.launch passes no visible_gpus), i.e. this node's first GPU",
                      flush=True)
        save()
    bad = [n for n, r in results.items() if r["status"] in ("FAIL", "TIMEOUT")]
    record.update(complete=True, passed=not bad)
    save()
    return (1 if bad else 0), record


def parse(argv: list[str]) -> argparse.Namespace:
    names = [c.name for c in CHECKS]
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="where gpu_smoke.json and logs/ go (default: a new temp dir; never the repository)")
    ap.add_argument("--dry-run", action="store_true", help="the same checks on the CPU at the smallest sizes "
                    "(ResNet-18, 32 px, 2 local tasks over gloo); no GPU needed")
    ap.add_argument("--work", help="scratch dir for the images, .beton files and runs (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (default: removed at the end)")
    ap.add_argument("--only", help=f"comma-separated checks (env and data always run): {', '.join(names)}")
    ap.add_argument("--batch", type=int, help="global pretraining batch (default 256; --dry-run 16): a GPU that "
                    "cannot hold 256 two-view 224 px samples")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every check's timeout")
    ap.add_argument("--timeout", action="append", default=[], metavar="CHECK=SECONDS",
                    help="one check's timeout (repeatable), instead of its default (--timeout-scale multiplies it too)")
    ap.add_argument("--plan", action="store_true", help="print the plan (estimates, timeouts, the experiments at "
                    "these sizes) as JSON and exit; runs nothing")
    ap.add_argument("--quiet", action="store_true", help="no live output of the checks (it is in DIR/logs)")
    a = ap.parse_args(argv)
    unknown = set((a.only or "").split(",")) - set(names) - {""}
    if unknown:
        ap.error(f"--only: unknown check(s) {sorted(unknown)}; choose from {', '.join(names)}")
    a.timeouts = {}
    for item in a.timeout:
        name, _, secs = item.partition("=")
        try:
            a.timeouts[name] = float(secs)
        except ValueError:
            ap.error(f"--timeout {item!r}: expected CHECK=SECONDS")
        if name not in names:
            ap.error(f"--timeout: unknown check {name!r}; choose from {', '.join(names)}")
    if a.batch is not None and (a.batch < 8 or a.batch % 8):
        ap.error("--batch must be a multiple of 8 (2 tasks x 4 micro-batches)")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    sizes = DRY if a.dry_run else GPU
    if a.batch:
        sizes = dataclasses.replace(sizes, batch=a.batch, accu_batch=a.batch)
    if not sizes.workers:  # FFCV threads per task: the cores shared by the 2 tasks, at most the presets' 8
        sizes = dataclasses.replace(sizes, workers=max(1, min(8, (os.cpu_count() or 2) // 2)))
    chosen = set((a.only or "").split(",")) - {""}
    checks = [dataclasses.replace(c, timeout_s=a.timeouts.get(c.name, c.timeout_s)) for c in CHECKS
              if not chosen or c.name in ("env", "data") or c.name in chosen]
    if a.plan:
        print(json.dumps(plan(checks, a.dry_run, sizes, a.timeout_scale), indent=2))
        return 0
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="gpu_smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_smoke_work-"))
    print(f"gpu_smoke: {'CPU dry run' if a.dry_run else 'GPU check'}; results -> {out}, scratch -> {work}", flush=True)
    t0 = time.perf_counter()
    try:
        status, record = run_checks(checks, out=out, work=work, dry_run=a.dry_run, sizes=sizes, argv=argv,
                                    timeout_scale=a.timeout_scale, echo=not a.quiet)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if status == 2:
        print("error: no CUDA GPU found (torch.cuda.is_available() is False); this check needs one. For the same "
              "checks on the CPU: python -m benchmarks.gpu_smoke --dry-run", file=sys.stderr)
        return 2
    results = record["checks"]
    print("\n" + table(results))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; wrote {out / 'gpu_smoke.json'} and {out / 'logs'}/"
          + (f"; kept {work}" if a.keep else ""))
    bad = [f"{n} ({r['status']})" for n, r in results.items() if r["status"] in ("FAIL", "TIMEOUT")]
    print(f"FAILED: {', '.join(bad)}" if bad else "all checks passed (SKIP: does not apply on this machine)")
    return status


if __name__ == "__main__":
    sys.exit(main())
