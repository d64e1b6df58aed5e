"""The checks of ``python -m benchmarks.gpu_smoke``, one process each:

    python -m benchmarks.gpu_smoke_checks NAME MODULE:FUNCTION CTX.json RESULT.json

``benchmarks.gpu_smoke`` starts one such process per check, in a session of its own (a timeout kills
the check together with the submitit controller and tasks it started) and reads RESULT.json:
``{"status": "PASS" | "FAIL" | "SKIP", "note": ..., <figures>}``.

Every stage runs the project's own functions (``barlow.pretrain.pretrain``, ``barlow.probe.run_probes``,
``barlow.probe_merge.merge_passes``) through ``barlow.launch.run`` with submitit's local executor, so each
task goes through ``StageJob`` -> ``distributed.setup()`` exactly as on a cluster. The 2-task checks
run two tasks on ONE GPU (submitit gives both ``CUDA_VISIBLE_DEVICES=0``): the task with LOCAL_RANK 1
computes on ``cuda:0``, the case a device derived from the local rank gets wrong; over gloo
(``BARLOW_DIST_BACKEND=gloo``, read by ``setup()``: NCCL refuses two ranks on one GPU). With
``--dry-run`` the same checks run on the CPU (``gpus_per_node: 0``) at the smallest sizes.

A check is a function ``check_x(ctx) -> dict`` of the context the harness writes (work dir, sizes,
what the ``env`` check found); it raises ``Skip`` when it cannot apply here and any other exception
to fail. Its runs live under ``<work>/<check name>/``.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import importlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN, ACCU4 = "imagenet_r50_ep300", "imagenet_r50_ep300_accu4"
CHECKS_MODULE = "benchmarks.gpu_smoke_checks"
FAST_PROTOCOL_FROM = "fmnist_r18"  # the project's cached single-pass ("fast") probe protocol
CLASSES = 10
HEADS = ["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"]


class Skip(Exception):
    """A check that cannot apply here (the reason is the message): SKIP, neither PASS nor FAIL."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each check is. ``None`` keeps the preset's value (ResNet-50, 224 px, 8192-wide projector)."""

    arch: str | None
    image_size: int | None
    projector: tuple[int, ...] | None
    batch: int               # global pretraining batch (a 2-task run: half per task)
    accu_batch: int          # global batch of the accumulation check (2 tasks x 4 micro-batches)
    steps: int               # optimizer steps of each pretraining run
    fp16_steps: int          # of the fp16 run: the GradScaler skips the first steps while its scale (2^16) comes down
    resume_at: int           # checkpoint cadence of the killed run: SIGKILLed once its first checkpoint exists
    warmup: int              # first steps of each incarnation left out of images/s (cudnn.benchmark's search)
    train_images: int
    val_images: int
    probe_batch: int         # global probe batch
    cached_epochs: int       # epochs of the cached single pass (the augmented passes: 1, as smoke mode)
    workers: int             # FFCV decode threads per task (0: from the cores, set by the harness)
    sides: tuple[tuple[int, int], ...]  # (w, h) of the generated images, in turn


# One H200: ImageNet's shapes (ResNet-50, 224 px, projector 8192-8192-8192), global batch 256 (the
# preset's per-GPU batch; 2 x 128 in the 2-task checks), one epoch of 2048 images.
GPU = Sizes(arch=None, image_size=None, projector=None, batch=256, accu_batch=256, steps=8, fp16_steps=16, resume_at=4,
            warmup=1, train_images=2048, val_images=512, probe_batch=256, cached_epochs=2, workers=0,
            sides=((500, 375), (300, 400), (160, 120), (640, 480), (250, 250), (120, 200), (375, 500)))
# The CPU dry run: the same checks at the smallest sizes that keep every code path.
DRY = Sizes(arch="resnet18", image_size=32, projector=(64, 64, 64), batch=16, accu_batch=32, steps=5, fp16_steps=4,
            resume_at=2, warmup=1, train_images=128, val_images=32, probe_batch=16, cached_epochs=2, workers=1,
            sides=((48, 36), (36, 48), (40, 40), (64, 48), (30, 44)))


def sizes(ctx: dict) -> Sizes:
    s = dict(ctx["sizes"])
    s["projector"] = tuple(s["projector"]) if s["projector"] else None
    s["sides"] = tuple(tuple(x) for x in s["sides"])
    return Sizes(**s)


def work(ctx: dict) -> Path:
    return Path(ctx["work"])


def data_paths(ctx: dict) -> tuple[Path, Path]:
    d = work(ctx) / "data"
    train, val = d / "train.beton", d / "val.beton"
    if not (train.is_file() and val.is_file()):
        raise Skip("no .beton files (the data check did not pass)")
    return train, val


# --------------------------------------------------------------------------- environment / provenance

def check_env(ctx: dict) -> dict:
    """What this machine's torch sees (the provenance of the figures). Runs first; CUDA starts here
    only, never in the harness."""
    import platform

    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cuda_available": torch.cuda.is_available(), "gpu_count": 0, "gpu": None, "gpus": [],
           "bf16": False, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(n)]
        out.update(gpu_count=n, gpu=props[0].name, gpus=[p.name for p in props],
                   gpu_memory_gib=round(props[0].total_memory / 2**30, 1),
                   capability=f"{props[0].major}.{props[0].minor}", bf16=bool(torch.cuda.is_bf16_supported()),
                   driver=_nvidia_smi("driver_version"))
    out["note"] = (f"{out['gpu_count']} x {out['gpu']}" if out["gpu"] else "no CUDA GPU") + \
        f", torch {out['torch']}, CUDA {out['cuda']}, cuDNN {out['cudnn']}"
    return out


def _nvidia_smi(field: str) -> str | None:
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


# --------------------------------------------------------------------------- data

def write_class_folder(root: Path, s: Sizes, processes: int = 1) -> Path:
    """``CLASSES`` ImageNet-like class folders (``n00000000`` ...) of smooth random images in every mode a real
    ImageNet copy holds (``barlow.synthetic``: RGB JPEG, grey, CMYK JPEG, RGBA, 16-bit and palette PNG), sizes
    ``s.sides`` in turn, ``s.train_images`` / ``s.val_images`` in all (rounded up to whole classes)."""
    from barlow.synthetic import write_odd_image_folder

    return write_odd_image_folder(root, [f"n{c:08d}" for c in range(CLASSES)], math.ceil(s.train_images / CLASSES),
                                  math.ceil(s.val_images / CLASSES), sizes=s.sides, smooth=True, processes=processes)


def check_data(ctx: dict) -> dict:
    """A class folder (ImageNet-like sizes and odd image modes) -> train/val .beton files with the
    ImageNet settings (proportion, max side 500, JPEG quality 90), as ``python -m barlow convert``."""
    from barlow.atomic import write_json
    from barlow.convert import WriteOptions, convert

    s, d = sizes(ctx), work(ctx) / "data"
    t0 = time.perf_counter()
    root = write_class_folder(d / "images", s, processes=min(16, ctx["cpus"]))
    t_gen = time.perf_counter() - t0
    opts = WriteOptions("proportion", 500, 90, 0.5)
    t1 = time.perf_counter()
    tr = convert("image_folder", str(root), "train", d / "train.beton", limit=s.train_images, workers=ctx["cpus"],
                 options=opts)
    va = convert("image_folder", str(root), "val", d / "val.beton", limit=s.val_images, workers=ctx["cpus"],
                 options=opts, classes=tr["classes"])
    dt = time.perf_counter() - t1
    for name, summary in (("train", tr), ("val", va)):
        write_json(d / f"{name}.json", summary)  # beside each .beton, as the convert stage writes it
    if tr["images"] != s.train_images or va["images"] != s.val_images:
        raise AssertionError(f"converted {tr['images']} + {va['images']} images, expected {s.train_images} + "
                             f"{s.val_images}")
    return {"images_per_s": round((tr["images"] + va["images"]) / dt, 1), "train_images": tr["images"],
            "val_images": va["images"], "classes": len(tr["classes"]), "generate_s": round(t_gen, 1),
            "note": f"{tr['images']} + {va['images']} images -> .beton (proportion, max side 500) at "
                    f"{(tr['images'] + va['images']) / dt:,.0f} images/s"}


# --------------------------------------------------------------------------- configs and launches

def experiment(ctx: dict, preset: str, batch: int | None = None) -> dict:
    """``smoke(resolve(preset))`` at this run's sizes: the preset's model, loss, optimizer, precision,
    channels_last, decoder, monitor and probe protocol; only the amounts shrink."""
    from barlow.config import resolve, smoke

    s = sizes(ctx)
    over: dict = {}
    if s.arch:
        over.setdefault("model", {})["arch"] = s.arch
    if s.projector:
        over.setdefault("model", {})["projector"] = list(s.projector)
    if s.image_size:
        over["data"] = {"image_size": s.image_size}
        over["pretrain"] = {"augment": {"view1": {"size": s.image_size}, "view2": {"size": s.image_size}}}
        over["probe"] = {"pooling": "auto"}  # the published pooling table exists for ResNet-50 at 224 px only
    full = resolve(preset, over)
    cfg = smoke(full)
    p, fp = cfg["pretrain"], full["pretrain"]
    batch = batch or s.batch
    if fp.get("loss_group"):  # the recipe's number of as-trained groups (8), as smoke() keeps it
        p["loss_group"] = max(2, batch // max(1, fp["batch_size"] // fp["loss_group"]))
    p.pop("limit_train", None)
    # checkpoints at epoch ends and at the end only (a ResNet-50 checkpoint is 1.4 GB)
    # the precision asked is the one run, on a CPU dry run too (its fp16 check is the GradScaler path's)
    p.update(batch_size=batch, max_steps=s.steps, workers=s.workers, checkpoint_every_steps=10**9, cpu_fp16="fp16")
    cfg["probe"].pop("limit_train", None)
    cfg["probe"]["workers"] = s.workers
    for ps in cfg["probe"]["passes"]:
        ps["batch_size"] = s.probe_batch
        if s.image_size:  # the published resize 256 -> crop 224, at this size
            ps["eval_resize"] = round(s.image_size * 256 / 224)
    return cfg


def launcher(ctx: dict, tasks: int, gpus: int | None = None) -> dict:
    """submitit's local executor: ``tasks`` tasks on this machine, all on one GPU (none in the dry run).
    timeout_min is submitit's own (it signals USR2 = requeue before it): far beyond the harness's
    per-check timeout, which kills a hung check first."""
    if gpus is None:
        gpus = 0 if ctx["dry_run"] else 1
    return {"executor": "local", "tasks_per_node": tasks, "gpus_per_node": gpus,
            "cpus_per_task": max(1, ctx["cpus"] // tasks), "timeout_min": 24 * 60}


def launch(ctx: dict, fn, run_dir: Path, name: str, stage: str, tasks: int, gpus: int | None = None, **kw):
    """``barlow.launch.run`` as ``python -m barlow <stage> --launcher-json ...`` calls it."""
    from barlow import launch as bl

    return bl.run(fn, launcher(ctx, tasks, gpus), run_dir, name=name, stage=stage, **kw)


def job_logs(run_dir: Path) -> tuple[str, list[str]]:
    """The last job of ``run_dir`` (its job.json) and each task's stdout + stderr, by rank."""
    job = json.loads((run_dir / "job.json").read_text())
    folder, jid, out = run_dir / "submitit", job["job_id"], []
    for rank in range(int(job.get("tasks", 1))):
        text = ""
        for ext in ("out", "err"):
            f = folder / f"{jid}_{rank}_log.{ext}"
            text += f.read_text(errors="replace") if f.is_file() else ""
        out.append(text)
    return jid, out


RANK_LINE = re.compile(r"rank (\d+)/(\d+) on .*device ([\w:]+)\)")


def task_devices(run_dir: Path, tasks: int) -> list[str]:
    """Each task's compute device as ``StageJob`` printed it after ``distributed.setup()``."""
    jid, logs = job_logs(run_dir)
    found = {}
    for text in logs:
        for m in RANK_LINE.finditer(text):
            found[int(m.group(1))] = (int(m.group(2)), m.group(3))
    if sorted(found) != list(range(tasks)) or any(w != tasks for w, _ in found.values()):
        raise AssertionError(f"job {jid}: expected {tasks} task(s) reporting rank r/{tasks}, found {found}")
    return [found[r][1] for r in range(tasks)]


def assert_devices(ctx: dict, run_dir: Path, tasks: int, gpus: int = 1) -> list[str]:
    devices = task_devices(run_dir, tasks)
    want = ["cpu"] * tasks if ctx["dry_run"] else ["cuda:0"] * tasks  # narrowed: every task's GPU is its cuda:0
    if devices != want:
        raise AssertionError(f"tasks computed on {devices}, expected {want} (LOCAL_RANK 0..{tasks - 1}, "
                             f"{gpus if not ctx['dry_run'] else 0} GPU(s) for the job)")
    return devices


def set_backend(backend: str | None) -> None:
    """The process-group backend the launched tasks' ``distributed.setup()`` reads (inherited through
    submitit's local controller); None: setup()'s own choice (nccl on GPU, gloo on CPU)."""
    if backend:
        os.environ["BARLOW_DIST_BACKEND"] = backend
    else:
        os.environ.pop("BARLOW_DIST_BACKEND", None)


@dataclasses.dataclass
class StageCall:
    """A pretraining stage call as a task runs it, instrumented for the figures (nothing else changes):

    - ``pid_dir``: the task writes its pid to ``<pid_dir>/rank<r>.pid`` first (for ``kill_when``);
    - ``sync_every``: ``barlow.pretrain_log.SYNC_EVERY``, the steps between two host syncs of the losses
      (25: metrics.csv rows come 25 at a time, and a row's ``samples_per_s`` is its window's mean).
      1 gives every step its own synced rate, so the first steps (cudnn.benchmark's search) can be
      left out of images/s; it costs one host sync a step (the figures are, if anything, low)."""

    fn: object
    pid_dir: str | None = None
    sync_every: int | None = 1

    def __call__(self, env=None):
        if self.pid_dir:
            Path(self.pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.pid_dir) / f"rank{env.rank}.pid").write_text(str(os.getpid()))
        if self.sync_every:
            import barlow.pretrain_log as bp

            if not hasattr(bp, "SYNC_EVERY"):
                raise AssertionError("barlow.pretrain_log.SYNC_EVERY is gone: update benchmarks/gpu_smoke_checks.py")
            bp.SYNC_EVERY = self.sync_every
        return self.fn(env=env)


@contextlib.contextmanager
def kill_when(ready, pids: Path, what: str, poll_s: float = 0.02):
    """While the ``with`` block runs (a launch of ``StageCall(pid_dir=pids)`` stages): as soon as
    ``ready()`` is true, SIGKILL every task that recorded its pid in ``pids``, all at once: a node lost
    in the middle of training (no handler runs, nothing is flushed). The watcher is a thread of this
    process, not of the tasks, so a busy task cannot delay its own kill. Yields a dict that gets
    ``killed`` (the ranks)."""
    said: dict = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if ready():
                said["killed"] = []
                for f in sorted(pids.glob("rank*.pid")):
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(f.read_text()), signal.SIGKILL)
                        said["killed"].append(f.stem)
                print(f"gpu_smoke: {what}: SIGKILL to {', '.join(said['killed']) or 'no task'}", flush=True)
                return
            stop.wait(poll_s)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield said
    finally:
        stop.set()
        t.join()


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        # the monitor's columns are empty on steps it did not evaluate
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def rates(rows: list[dict], batch: int, warmup: int, starts: tuple[int, ...] = (0,)) -> dict:
    """Median per-step samples/s (metrics.csv ``samples_per_s``: two views a sample) leaving out the first
    ``warmup`` steps of each incarnation (``starts``: the index of its first row), and the last
    incarnation's measured steps by wall time (its checkpoint and monitor time included)."""
    skip = {i for s0 in starts for i in range(s0, s0 + warmup)}
    meas = [r for i, r in enumerate(rows) if i not in skip] or rows[-1:]
    first = min(starts[-1] + warmup, len(rows) - 1)
    wall = rows[-1]["elapsed_s"] - (rows[first - 1]["elapsed_s"] if first > 0 else 0.0)
    n = len(rows) - first
    return {"images_per_s": round(statistics.median(r["samples_per_s"] for r in meas), 1),
            "wall_images_per_s": round(batch * n / wall, 1) if wall > 0 and n > 0 else None,
            "measured_steps": len(meas)}


def check_run(out: Path, cfg: dict, steps: int, precision: str) -> tuple[list[dict], dict]:
    """What a finished pretraining run must have left: metrics rows 1..steps once each, finite losses
    (fp16: the scaler may skip a few), finite weights, the precision and step count in backbone.pth."""
    import torch

    from barlow.checkpoint import load_backbone

    rows = read_metrics(out.parent / "metrics.csv")
    got = [int(r["step"]) for r in rows]
    if got != list(range(1, steps + 1)):
        raise AssertionError(f"metrics.csv steps {got}, expected 1..{steps} once each")
    bad = [int(r["step"]) for r in rows if not math.isfinite(r["loss"])]
    if (bad and precision != "amp_fp16") or len(bad) >= steps or not math.isfinite(rows[-1]["loss"]):
        raise AssertionError(f"non-finite loss at steps {bad}")
    blob = load_backbone(out, cfg["model"]["arch"])
    if blob.get("steps") != steps or blob.get("precision") != precision:
        raise AssertionError(f"backbone.pth: {blob.get('steps')} steps in {blob.get('precision')}, expected "
                             f"{steps} in {precision}")
    badw = [k for k, v in blob["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if badw:
        raise AssertionError(f"non-finite backbone weights: {badw[:3]}")
    return rows, blob


def checkpoint_state(run_dir: Path) -> dict:
    """step and scaler state of run_dir/checkpoint.pt (memory-mapped: ResNet-50's is 1.4 GB)."""
    import torch

    ck = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False, mmap=True)
    return {"step": ck["step"], "scaler": dict(ck.get("scaler") or {}),
            "optimizer_state": len(ck["optimizer"]["state"])}


def drop_checkpoint(run_dir: Path) -> None:
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # 1.4 GB for ResNet-50: keep the work dir small


# --------------------------------------------------------------------------- pretraining

def _pretrain(ctx: dict, name: str, cfg: dict, tasks: int) -> tuple[Path, float]:
    from barlow.pretrain import pretrain

    train, _ = data_paths(ctx)
    run = work(ctx) / name
    out = run / "backbone.pth"
    t0 = time.perf_counter()
    shutil.rmtree(run, ignore_errors=True)
    launch(ctx, StageCall(functools.partial(pretrain, cfg, str(train), str(out))), run, f"gpu-smoke-{name}",
           "pretrain", tasks)
    return out, time.perf_counter() - t0


def check_pretrain_resume(ctx: dict) -> dict:
    """imagenet_r50_ep300 as it is (fp32, channels_last, SyncBN on the GPU, monitor) on 2 tasks on one GPU,
    checkpointing every resume_at steps: SIGKILLed (every task at once) as soon as its first checkpoint
    exists, relaunched through the same launch path, resumed from that checkpoint on the GPU (the
    relaunch says so, computes only the later steps, keeps the earlier metrics rows and wall clock),
    finished at the last step with metrics rows 1..steps once each."""
    from barlow.pretrain import pretrain

    s, train = sizes(ctx), data_paths(ctx)[0]
    set_backend("gloo")
    cfg = experiment(ctx, PRETRAIN)
    cfg["pretrain"]["checkpoint_every_steps"] = s.resume_at
    run = work(ctx) / "pretrain_resume"
    out, metrics = run / "backbone.pth", run / "metrics.csv"
    stage = functools.partial(pretrain, cfg, str(train), str(out))
    shutil.rmtree(run, ignore_errors=True)
    ckpt = run / "checkpoint.pt"
    t0 = time.perf_counter()
    try:  # the first checkpoint (step resume_at; written atomically: it exists only once complete)
        with kill_when(ckpt.is_file, run / "pids", f"{ckpt.name} of step {s.resume_at} written") as kill:
            launch(ctx, StageCall(stage, pid_dir=str(run / "pids")), run, "gpu-smoke-pretrain-killed", "pretrain", 2)
    except Exception as e:  # noqa: BLE001 - the killed job ends without a result: expected
        ended = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    else:
        raise AssertionError(f"the run finished before its kill after the step-{s.resume_at} checkpoint ({kill})")
    t_killed = time.perf_counter() - t0
    first_devices = assert_devices(ctx, run, 2)
    snapshot = read_metrics(metrics) if metrics.is_file() else []
    if kill.get("killed") != ["rank0", "rank1"] or out.exists():
        _, logs = job_logs(run)
        raise AssertionError(f"the first run ended with {len(snapshot)} metrics rows before its kill ({ended}); "
                             f"rank 0's log ends: {logs[0].strip().splitlines()[-3:]}")
    saved = checkpoint_state(run)["step"]  # resume_at, or a later one if the kill landed late
    if not (s.resume_at <= saved < s.steps and saved <= len(snapshot)):
        raise AssertionError(f"checkpoint.pt at step {saved} after the kill at {len(snapshot)} rows, expected "
                             f"{s.resume_at}..{s.steps - 1}")

    t1 = time.perf_counter()
    launch(ctx, StageCall(stage), run, "gpu-smoke-pretrain-resumed", "pretrain", 2)
    t_resumed = time.perf_counter() - t1
    devices = assert_devices(ctx, run, 2)
    _, logs = job_logs(run)
    said = re.search(r"resuming from \S*checkpoint\.pt at step (\d+)/(\d+)", logs[0])
    if not said or (int(said.group(1)), int(said.group(2))) != (saved, s.steps):
        raise AssertionError(f"the relaunched run did not say it resumed at step {saved}/{s.steps}: "
                             f"{said and said.group(0)}")
    computed = [int(m) for m in re.findall(r"^step (\d+)/\d+ ", logs[0], re.M)]
    if computed and computed[0] != saved + 1:
        raise AssertionError(f"the resumed run's first step was {computed[0]}, expected {saved + 1}")
    rows, _ = check_run(out, cfg, s.steps, "fp32")
    keys = ("step", "loss", "lr", "samples_per_s", "elapsed_s")
    if [[r[k] for k in keys] for r in rows[:saved]] != [[r[k] for k in keys] for r in snapshot[:saved]]:
        raise AssertionError("the resumed run rewrote the killed run's first rows (it restarted instead of resuming)")
    if not rows[saved]["elapsed_s"] > rows[saved - 1]["elapsed_s"]:
        raise AssertionError("elapsed_s does not continue across the resume")
    drop_checkpoint(run)
    fig = rates(rows, s.batch, s.warmup, starts=(0, saved))
    return {**fig, "tasks": 2, "backend": "gloo", "devices": devices, "killed_run_devices": first_devices,
            "killed_at_rows": len(snapshot), "resumed_from": saved, "final_step": s.steps,
            "killed_run_s": round(t_killed, 1), "resumed_run_s": round(t_resumed, 1), "killed_run_ended": ended,
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "note": f"2 tasks on {devices}, gloo; SIGKILL at {len(snapshot)} rows, resumed from step {saved}, "
                    f"steps 1..{s.steps} once each; loss {rows[0]['loss']:.4g} -> {rows[-1]['loss']:.4g}"}


def _precision(ctx: dict, name: str, precision: str, steps: int | None = None) -> tuple[dict, dict]:
    s = sizes(ctx)
    steps = steps or s.steps
    set_backend(None)
    cfg = experiment(ctx, PRETRAIN)
    cfg["pretrain"].update(precision=precision, max_steps=steps)
    cfg["pretrain"]["monitor"] = {**cfg["pretrain"].get("monitor", {}), "enabled": False}  # (pretrain_resume has it)
    out, dt = _pretrain(ctx, name, cfg, tasks=1)
    devices = assert_devices(ctx, out.parent, 1)
    rows, _ = check_run(out, cfg, steps, precision)
    state = checkpoint_state(out.parent)
    drop_checkpoint(out.parent)
    fig = {**rates(rows, s.batch, s.warmup), "tasks": 1, "devices": devices, "precision": precision,
           "stage_s": round(dt, 1), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}
    fig["note"] = (f"1 task on {devices[0]}, {precision}, batch {s.batch}, loss {rows[0]['loss']:.4g} -> "
                   f"{rows[-1]['loss']:.4g}")
    return fig, state


def check_pretrain_amp_bf16(ctx: dict) -> dict:
    if not ctx["dry_run"] and not ctx["env"].get("bf16"):
        raise Skip(f"{ctx['env'].get('gpu')} has no native bf16")
    return _precision(ctx, "pretrain_amp_bf16", "amp_bf16")[0]


def check_pretrain_amp_fp16(ctx: dict) -> dict:
    """fp16 autocast with the GradScaler, 1 task. It starts at scale 2^16 and halves it at every step
    whose gradients overflow (that step is skipped), growing only after 2000 good steps: a run whose
    every step was skipped *and* whose scale came down to 1 cannot train in fp16 at all (the GPU run's 16
    steps take it from 2^16 to 1)."""
    s = sizes(ctx)
    fig, state = _precision(ctx, "pretrain_amp_fp16", "amp_fp16", steps=s.fp16_steps)
    scale = state["scaler"].get("scale")
    if scale is None:
        raise AssertionError("the GradScaler was not enabled (its saved state is empty)")
    if not (math.isfinite(scale) and scale > 0 and math.log2(scale).is_integer()):
        raise AssertionError(f"GradScaler scale {scale}")
    skipped = max(0, 16 - int(math.log2(scale)))
    applied = s.fp16_steps - skipped
    if applied <= 0 and scale <= 1:
        raise AssertionError(f"all {s.fp16_steps} steps skipped and the loss scale is down to {scale}: the "
                             "gradients overflow fp16 even unscaled")
    if applied > 0 and state["optimizer_state"] == 0:
        raise AssertionError(f"{applied} step(s) applied by the scaler but the optimizer has no state")
    fig.update(scaler_scale=scale, scaler_skipped_steps=skipped, applied_steps=applied)
    fig["note"] += f", loss scale 2^{int(math.log2(scale))}: {skipped} of {s.fp16_steps} steps skipped"
    return fig


def check_pretrain_accu4(ctx: dict) -> dict:
    """imagenet_r50_ep300_accu4 (gradient caching over 4 micro-batches, DDP's no_sync before the last) on
    2 tasks on one GPU."""
    s = sizes(ctx)
    set_backend("gloo")
    cfg = experiment(ctx, ACCU4, batch=s.accu_batch)
    cfg["pretrain"]["monitor"] = {**cfg["pretrain"].get("monitor", {}), "enabled": False}  # (pretrain_resume has it)
    out, dt = _pretrain(ctx, "pretrain_accu4", cfg, tasks=2)
    devices = assert_devices(ctx, out.parent, 2)
    rows, _ = check_run(out, cfg, s.steps, "fp32")
    drop_checkpoint(out.parent)
    micro = s.accu_batch // (2 * cfg["pretrain"]["accumulation"])
    return {**rates(rows, s.accu_batch, s.warmup), "tasks": 2, "devices": devices, "stage_s": round(dt, 1),
            "accumulation": cfg["pretrain"]["accumulation"], "micro_batch_per_task": micro,
            "note": f"2 tasks on {devices}, gloo; {s.accu_batch} = 2 x {micro} x {cfg['pretrain']['accumulation']}, "
                    f"loss {rows[0]['loss']:.4g} -> {rows[-1]['loss']:.4g}"}


def check_pretrain_nccl(ctx: dict) -> dict:
    """Two GPUs or more: 2 tasks on 2 GPUs over NCCL with SyncBatchNorm, the cluster's own layout."""
    if ctx["dry_run"]:
        raise Skip("NCCL needs GPUs (dry run)")
    if ctx["env"].get("gpu_count", 0) < 2:
        raise Skip(f"needs 2 GPUs for NCCL + SyncBN; this machine has {ctx['env'].get('gpu_count', 0)}")
    s = sizes(ctx)
    set_backend(None)  # distributed.setup(): nccl on GPU
    cfg = experiment(ctx, PRETRAIN)
    cfg["pretrain"]["monitor"] = {**cfg["pretrain"].get("monitor", {}), "enabled": False}
    train, _ = data_paths(ctx)
    from barlow.pretrain import pretrain

    run = work(ctx) / "pretrain_nccl"
    out = run / "backbone.pth"
    t0 = time.perf_counter()
    launch(ctx, StageCall(functools.partial(pretrain, cfg, str(train), str(out))), run, "gpu-smoke-pretrain-nccl",
           "pretrain", 2, gpus=2)
    dt = time.perf_counter() - t0
    devices = task_devices(run, 2)
    if devices != ["cuda:0", "cuda:0"]:
        raise AssertionError(f"tasks computed on {devices}, expected each on its own GPU as cuda:0")
    rows, _ = check_run(out, cfg, s.steps, "fp32")
    drop_checkpoint(run)
    return {**rates(rows, s.batch, s.warmup), "tasks": 2, "backend": "nccl", "devices": devices,
            "stage_s": round(dt, 1), "note": "2 tasks on 2 GPUs (each its cuda:0), nccl, SyncBatchNorm"}


# --------------------------------------------------------------------------- data loading

def loader_rate(train: str, batch: int, size: int, workers: int, env=None) -> str:
    """(Runs in a task.) Two-view FFCV rrc decoding of one epoch to the task's device, as pretraining
    loads it (ToDevice on a GPU); returns JSON: pairs/s after the first batch (numba's compile)."""
    import torch

    from barlow.loader import make_loader, split_batch

    loader = make_loader(train, batch, views=2, train=True, workers=workers, decode="rrc", size=size, device=env.device)
    want = torch.device(env.device).type
    times, it = [], iter(loader)
    try:
        for b in it:
            (x1, x2), y = split_batch(b, 2)
            if want == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            for x in (x1, x2):
                if x.device.type != want or x.dtype != torch.uint8 or tuple(x.shape) != (batch, 3, size, size):
                    raise AssertionError(f"batch {tuple(x.shape)} {x.dtype} on {x.device}, expected "
                                         f"({batch}, 3, {size}, {size}) uint8 on {want}")
    finally:
        it.close()
    if len(times) < 2:
        raise AssertionError(f"{len(times)} batch(es) of {batch}: too few images")
    return json.dumps({"images_per_s": round(batch * (len(times) - 1) / (times[-1] - times[0]), 1),
                       "batches": len(times), "device": env.device})


def check_loader(ctx: dict) -> dict:
    s = sizes(ctx)
    train, _ = data_paths(ctx)
    set_backend(None)
    size = s.image_size or 224
    run = work(ctx) / "loader"
    got = json.loads(launch(ctx, functools.partial(loader_rate, str(train), s.batch, size, s.workers), run,
                            "gpu-smoke-loader", "pretrain", 1))
    devices = assert_devices(ctx, run, 1)
    return {**got, "tasks": 1, "devices": devices,
            "note": f"two-view rrc {size} px to {got['device']}, batch {s.batch}, {s.workers} FFCV threads"}


# --------------------------------------------------------------------------- probes

def probe_backbone(ctx: dict, cfg: dict) -> tuple[Path, str]:
    """pretrain_resume's backbone, or (that check did not pass) an untrained one written here."""
    trained = work(ctx) / "pretrain_resume" / "backbone.pth"
    if trained.is_file():
        return trained, "pretrain_resume's backbone"
    from barlow.distributed import Env
    from barlow.pretrain import pretrain

    path = work(ctx) / "probe_backbone" / "backbone.pth"
    if not path.is_file():
        p = {**cfg["pretrain"], "init": "random", "monitor": {**cfg["pretrain"].get("monitor", {}), "enabled": False}}
        pretrain({**cfg, "pretrain": p}, str(data_paths(ctx)[0]), str(path), env=Env())
    return path, "an untrained backbone (pretrain_resume did not pass)"


def run_pass(ctx: dict, cfg: dict, pass_name: str, backbone: Path, out: Path, tasks: int = 2) -> tuple[dict, float]:
    """One probe pass as the workflow runs it (``python -m barlow probe --config-json <pass_config>
    --runtime-json <runtime_config>``, one job per pass), then its output checked: every head's top-1
    finite and in [0, 100], and the kNN column of an AvgPool pass."""
    from barlow.config import complete, deep_merge
    from barlow.estimate_memory import probe_memory_gb
    from barlow.identity import pass_config, runtime_config
    from barlow.loader import beton_length
    from barlow.probe import run_probes

    train, val = data_paths(ctx)
    runtime = runtime_config(cfg)
    pcfg = pass_config(cfg, pass_name)
    pcfg = complete(deep_merge(pcfg, {k: v for k, v in runtime.items() if k in pcfg}))
    lc = launcher(ctx, tasks)
    need = probe_memory_gb(pcfg, beton_length(train), beton_length(val), nodes=1, tasks_per_node=lc["tasks_per_node"])
    t0 = time.perf_counter()
    from barlow import launch as bl

    bl.run(functools.partial(run_probes, pcfg, str(backbone), str(train), str(val), str(out)), lc,
           out.parent / out.stem, name=f"gpu-smoke-probe-{pass_name}", stage="probe", need_mem_gb=need,
           need_why="the probe (cached features in float16 + loader)")
    dt = time.perf_counter() - t0
    assert_devices(ctx, out.parent / out.stem, tasks)
    if not out.is_file():
        raise AssertionError(f"{out}: not written")
    got = json.loads(out.read_text())
    heads = pcfg["probe"]["passes"][0]["heads"]
    top1 = got["top1"]
    if sorted(top1) != sorted(heads) or not all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 100
                                                for v in top1.values()):
        raise AssertionError(f"{out.name}: top-1 {top1}, expected a finite percentage for each of {heads}")
    if "avgpool" in heads and not (got.get("knn") and math.isfinite(got["knn"]["top1"])):
        raise AssertionError(f"{out.name}: no finite kNN top-1 ({got.get('knn')})")
    return got, dt


def _forwards(pcfg: dict, n_train: int, n_val: int) -> int:
    """Backbone forwards of one pass: cached: train + val once; augmented: every epoch's full batches,
    val, and the AvgPool pass's unaugmented kNN bank."""
    epochs = max([pcfg["epochs"], *(h.get("epochs", 0) for h in pcfg.get("head_overrides", {}).values())])
    if pcfg.get("cached"):
        return n_train + n_val
    bank = n_train if "avgpool" in pcfg["heads"] else 0
    return epochs * (n_train // pcfg["batch_size"] * pcfg["batch_size"]) + n_val + bank


def _probe_figures(ctx, cfg, results: dict, stage_s: float) -> dict:
    from barlow.loader import beton_length

    train, val = data_paths(ctx)
    n_train, n_val = beton_length(train), beton_length(val)
    passes = {p["name"]: p for p in cfg["probe"]["passes"]}
    forwards = sum(_forwards(passes[n], n_train, n_val) for n in results)
    inside = sum(r["probe_wall_s"] for r in results.values())
    return {"images_per_s": round(forwards / inside, 1) if inside > 0 else None, "backbone_forwards": forwards,
            "probe_wall_s": round(inside, 1), "stage_s": round(stage_s, 1)}


def check_probe_cached(ctx: dict) -> dict:
    """The fast protocol (the project's cached single pass: frozen features extracted once, all six heads
    trained on them) on the ImageNet backbone, data-parallel over 2 tasks on one GPU."""
    from barlow.config import load_preset

    s = sizes(ctx)
    set_backend("gloo")
    cfg = experiment(ctx, PRETRAIN)
    fast = load_preset(FAST_PROTOCOL_FROM)["probe"]
    for ps in fast["passes"]:
        ps.update(epochs=s.cached_epochs, batch_size=s.probe_batch)
        if s.image_size:
            ps["eval_resize"] = round(s.image_size * 256 / 224)
    cfg["probe"] = {**cfg["probe"], "protocol": fast["protocol"], "passes": fast["passes"]}
    backbone, which = probe_backbone(ctx, cfg)
    d = work(ctx) / "probe_cached" / "probes"
    results, stage_s = {}, 0.0
    for ps in cfg["probe"]["passes"]:
        if not ps.get("cached"):
            raise AssertionError(f"{FAST_PROTOCOL_FROM}'s pass {ps['name']} is not cached")
        results[ps["name"]], dt = run_pass(ctx, cfg, ps["name"], backbone, d / f"{ps['name']}.json")
        stage_s += dt
    top1 = {k: v for r in results.values() for k, v in r["top1"].items()}
    if sorted(top1) != sorted(HEADS):
        raise AssertionError(f"heads {sorted(top1)}, expected all six")
    return {**_probe_figures(ctx, cfg, results, stage_s), "tasks": 2, "protocol": fast["protocol"], "top1": top1,
            "knn_top1": next(r["knn"]["top1"] for r in results.values() if r.get("knn")),
            "note": f"cached single pass ({', '.join(results)}), 2 tasks, gloo, {which}"}


def check_probe_published(ctx: dict) -> dict:
    """imagenet_r50_ep300's published protocol (two augmented passes, the backbone forward on every batch:
    five_feature and avgpool), one job per pass over 2 tasks on one GPU, merged into probes.json."""
    from barlow.probe_merge import merge_passes

    set_backend("gloo")
    cfg = experiment(ctx, PRETRAIN)
    backbone, which = probe_backbone(ctx, cfg)
    d = work(ctx) / "probe_published" / "probes"
    results, stage_s = {}, 0.0
    for ps in cfg["probe"]["passes"]:
        if ps.get("cached"):
            raise AssertionError(f"{PRETRAIN}'s pass {ps['name']} is cached; the published protocol is not")
        results[ps["name"]], dt = run_pass(ctx, cfg, ps["name"], backbone, d / f"{ps['name']}.json")
        stage_s += dt
    merged = merge_passes([d / f"{n}.json" for n in results], d.parent / "probes.json")
    if sorted(merged["top1"]) != sorted(HEADS):
        raise AssertionError(f"probes.json: heads {sorted(merged['top1'])}, expected all six")
    return {**_probe_figures(ctx, cfg, results, stage_s), "tasks": 2, "protocol": merged["protocol"],
            "passes": list(results), "top1": merged["top1"], "knn_top1": merged["knn"]["top1"],
            "note": f"published, passes {' + '.join(results)} (one job each), 2 tasks, gloo, {which}"}


# --------------------------------------------------------------------------- entry point

def quiet_numba_finalizers() -> None:
    """Drop the 'Exception ignored ... KeyError' numba's dispatcher finalizer prints whenever an FFCV Loader
    is collected (harmless; pages of it would hide real errors)."""
    default = sys.unraisablehook

    def hook(u):
        tb = u.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if u.exc_type is KeyError and tb is not None and tb.tb_frame.f_code.co_filename.endswith(
                os.path.join("numba", "core", "dispatcher.py")):
            return
        default(u)

    sys.unraisablehook = hook


def resolve_target(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def write_result(path: Path, result: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)


def main(argv: list[str]) -> int:
    name, target, ctx_path, result_path = argv
    ctx = json.loads(Path(ctx_path).read_text())
    quiet_numba_finalizers()
    # the launched tasks unpickle this module's callables (StageCall, loader_rate): they must import it
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both tasks on this machine
    with contextlib.suppress(FileExistsError):
        (work(ctx) / name).mkdir(parents=True)
    import submitit

    # A job that ends without a result (the killed run) makes submitit wait 15 s per task for its result
    # file (slow NFS); the scratch dir is local: 1 s
    submitit.core.core.Job._results_timeout_s = 1
    skips = (Skip, importlib.import_module(CHECKS_MODULE).Skip)  # run as __main__: the module's own class too
    try:
        result = {"status": "PASS", **(resolve_target(target)(ctx) or {})}
    except skips as e:
        result = {"status": "SKIP", "note": str(e)}
    except Exception as e:  # noqa: BLE001 - any failure is this check's result; the harness runs the next one
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = "; try a smaller --batch" if "out of memory" in str(e).lower() else ""
        result = {"status": "FAIL", "note": f"{type(e).__name__}: {first}{hint}"}
    sys.stdout.flush()
    write_result(Path(result_path), result)
    return 0 if result["status"] != "FAIL" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
