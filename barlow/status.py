"""``python -m barlow status``: where every run of a workflow config stands, read from its files alone.

One row per run (an experiment, or one seed of it): its stage, throughput, time left, wall time, the
age of its last checkpoint, its job and how often that job was requeued. Nothing here imports torch,
FFCV or submitit, and nothing is written: it is meant for a login node, every few seconds if need be.

What each value is read from (every path from ``barlow.layout``, as the workflow's rules take them):

- the runs: the config as the workflow resolves it (``barlow.config.experiments``: preset + overrides +
  dataset + smoke mode + seeds; ``barlow.layout.assign_weights``: each run's pretraining folder);
- done: a stage's output file exists (``<weights>/backbone.pth``, ``<run>/probes/<pass>.json``,
  ``<run>/probes.json``); waiting / converting: the ``.beton`` is missing / its temporary file exists;
- pretraining step k of N: k is the last row of ``<weights>/metrics.csv``; N is pretraining's own rule
  (``barlow.pretrain._setup``) applied to the config and the number of images in the train ``.beton``'s
  header (read with ``struct``); throughput and ETA from the same rows;
- probing: the last ``epoch e/E`` line of the pass's log;
- failed: the last ``error:`` line (what the CLI prints) or exception line of the stage's Snakemake
  log or of its job's submitit stderr, when that log is newer than the stage's progress files and the
  job is not alive;
- job: ``job.json`` (written by ``barlow.launch``); its state from ``sacct`` (``squeue`` as fallback,
  5 s timeout each; ``-`` without them), or for a local job whether its process still runs;
  requeues: the starts of the job's rank-0 task (submitit logs ``Starting with JobEnvironment`` at
  each, requeues by submitit and by ``scontrol requeue`` alike) less one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from barlow import config as barlow_config
from barlow import layout
from barlow.errors import BadInput
from barlow.identity import pass_names
from barlow.runfiles import Job, beton_images, failure, local_state, metrics_rows, mtime, read_job, slurm_states, tail

# (column, what it means): the header of the table and of `--help`
COLUMNS = [
    ("RUN", "<dataset>/<experiment>[/seed<k>]: the run's folder under the results directory"),
    ("IMG/S", "pretraining images per second, as metrics.csv's last row measured it"),
    ("ETA", "pretraining time left at the speed of metrics.csv's recent rows (also for a run that is not "
            "running now: what it still needs)"),
    ("WALL", "wall time: pretraining's so far (metrics.csv elapsed_s); once done, pretraining + probes "
             "(probes.json)"),
    ("CKPT AGE", "time since the current stage's checkpoint was written (checkpoint.pt, or the probe pass's)"),
    ("UPDATED", "time since the run last wrote progress (metrics.csv, its logs): a live run updates every "
                "few seconds, a killed one stops"),
    ("JOB", "the job id of the current stage (its job.json; the pretraining job once done)"),
    ("STATE", "SLURM's state of that job (sacct, squeue); a local job: running or ended; - : unknown"),
    ("REQUEUES", "how often that job was started again after a timeout, preemption or requeue"),
    ("STAGE", "waiting for input / converting <split> / pretraining queued (its SLURM job pending) / pretraining "
              "step k of N / probing <pass> (i/n) [queued], epoch e/E / merging probes / done / failed (<stage>): "
              "<its one-line error>"),
]
RATE_WINDOW = 200          # metrics.csv rows the ETA's speed is measured over


@dataclasses.dataclass
class Run:
    key: str              # the experiment, or "<experiment>/seed<k>" (barlow.config.Run.key)
    dataset: str
    cfg: dict             # resolved, defaults filled in (smoke mode applied)
    results: Path         # the results directory (<results>/smoke in smoke mode)
    weights: layout.Weights | None  # its pretraining's folder (shared by equal weights configs; None: released)

    @property
    def dir(self) -> Path:
        return Path(layout.run_dir(str(self.results), self.dataset, self.key))

    @property
    def wdir(self) -> Path:
        return Path(self.weights.dir) if self.weights else self.dir  # (a released file: no pretraining files)

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.key}"


def runs(config_file: str | Path = "config.yaml", smoke: bool = False) -> list[Run]:
    """The runs of a workflow config, resolved as the workflow resolves them (barlow.config.experiments,
    barlow.layout.assign_weights), with the defaults filled in (``pretrain.max_steps`` etc. are needed
    here; the workflow leaves that to the stages)."""
    wf = barlow_config.validate_workflow(barlow_config.load_yaml(config_file))
    smoke = smoke or barlow_config.is_smoke(wf["smoke"])
    results = layout.results_dir(wf["results"], smoke)
    exps = barlow_config.experiments(wf, smoke)
    weights = barlow_config.weights_folders(results, exps)
    return [Run(k, r.dataset, barlow_config.with_defaults(r.cfg), Path(results), weights.get(k)) for k, r in exps.items()]


def total_steps(cfg: dict, images: int | None) -> int | None:
    """Pretraining's optimizer steps, by barlow.pretrain._setup's rule (repeated here: it lives inside the
    trainer's setup, next to the loader): an epoch is floor(images / global batch) steps on any number of
    tasks and accumulation; the run is ceil(epochs x that), capped at max_steps. tests/test_status.py
    checks it against a checkpoint's ``total``."""
    p = cfg["pretrain"]
    if p["init"] == "random" or p["epochs"] == 0:
        return 0
    if images is None:
        return None
    n = min(images, p["limit_train"]) if p.get("limit_train") else images
    per_epoch = n // p["batch_size"]
    if per_epoch == 0:
        return None  # pretraining refuses it (its error says so)
    total = max(1, math.ceil(p["epochs"] * per_epoch))
    return min(total, p["max_steps"]) if p.get("max_steps") else total


# ---- one row ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    run: str
    stage: str
    rate: float | None = None       # images/s
    eta_s: float | None = None
    wall_s: float | None = None
    ckpt: Path | None = None        # the current stage's checkpoint file
    updated: float | None = None    # mtime of the newest progress file
    job: Job | None = None
    step: int | None = None
    total: int | None = None
    done: bool = False
    failed: str = ""
    queued: str = ""                # the stage while its job waits in SLURM's queue (no progress yet)
    # what may have failed: (stage label, its error logs, its progress files, its job), checked once the
    # jobs' states are known (a live job has not failed)
    checks: list = dataclasses.field(default_factory=list)


def _fmt_age(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class _Inspector:
    """Reads one run's files (paths as the workflow's rules name them)."""

    def __init__(self, run: Run):
        self.run = run
        self.r = str(run.results)

    def beton(self, split: str) -> Path:
        return Path(layout.beton(self.r, self.run.dataset, split))

    def inputs(self, splits: list[str]) -> Row | None:
        """A row for missing .beton files (waiting / converting / failed), None when all are there."""
        missing = [s for s in splits if not self.beton(s).is_file()]
        if not missing:
            return None
        for split in missing:
            b = self.beton(split)
            if list(b.parent.glob(f".{b.name}.*.tmp")):  # barlow.atomic's temporary name while converting
                return Row(self.run.name, f"converting {split}", updated=mtime(b.parent))
        for split in missing:
            log = Path(layout.convert_log(self.r, self.run.dataset, split))
            line = failure([log], [], None)
            if line:
                return Row(self.run.name, f"failed (convert {split}): {line}", failed=line, updated=mtime(log))
        return Row(self.run.name, "waiting for input (" + ", ".join(f"{s}.beton" for s in missing) + ")")

    def pretraining(self) -> Row:
        d = self.run.wdir
        rows = metrics_rows(d / "metrics.csv")
        total = total_steps(self.run.cfg, beton_images(self.beton("train")))
        job = read_job(d)
        log = Path(layout.pretrain_log(self.r, self.run.weights.dir))
        progress = [d / "metrics.csv", d / "checkpoint.pt"]
        row = Row(self.run.name, "", job=job, ckpt=d / "checkpoint.pt", total=total,
                  updated=max((t for t in map(mtime, [*progress, log, *(self._job_logs(job))]) if t), default=None))
        if total is None:  # (the images or the config do not say: what the trainer printed)
            total = _logged_total(tail(log)) or (_logged_total(tail(job.log("out"))) if job else None)
            row.total = total
        if rows:
            last = rows[-1]
            row.step, row.rate, row.wall_s = last["step"], last["samples_per_s"], last["elapsed_s"]
            row.eta_s = _eta(rows, total, self.run.cfg["pretrain"]["batch_size"])
        k = row.step if row.step is not None else 0
        started = rows or any(p.exists() for p in progress) or log.exists() or job is not None
        row.stage = f"pretraining step {k} of {total if total is not None else '?'}" if started else \
            "pretraining not started"
        label = row.stage if rows else "pretraining"
        row.queued = "" if rows else "pretraining queued"
        row.checks = [(label, [*self._job_logs(job, "err"), log], progress, job)]
        return row

    def probing(self) -> Row:
        names = pass_names(self.run.cfg)
        parts, queued, errors, ckpts, jobs, updated = [], [], [], [], [], []
        for i, name in enumerate(names, start=1):
            out = Path(layout.pass_file(self.r, self.run.dataset, self.run.key, name))
            if out.is_file():
                continue
            job = read_job(out.parent / name)
            log = Path(layout.probe_log(self.r, self.run.dataset, self.run.key, name))
            ckpt = Path(layout.pass_checkpoint(str(out)))
            logs = [log, *self._job_logs(job)]
            epoch = ""
            for text in (tail(p) for p in sorted((p for p in logs if p.exists()), key=mtime, reverse=True)):
                found = re.findall(r"epoch (\d+)/(\d+)", text)
                if found:
                    epoch = f", epoch {found[-1][0]}/{found[-1][1]}"
                    break
            started = epoch or ckpt.exists() or any(p.exists() for p in logs) or job is not None
            parts.append(f"probing {name} ({i}/{len(names)})" + (epoch if started else " not started"))
            queued.append(f"probing {name} ({i}/{len(names)}) queued" if not epoch and not ckpt.exists() else parts[-1])
            errors.append((f"probing {name}", [*self._job_logs(job, "err"), log], [ckpt], job))
            ckpts.append(ckpt)
            jobs.append(job)
            updated += [mtime(p) for p in [*logs, ckpt]]
        if not parts:
            log = Path(layout.merge_log(self.r, self.run.dataset, self.run.key))
            row = Row(self.run.name, "merging probes", updated=mtime(log))
            row.checks = [("merging probes", [log], [], None)]
            return row
        present = [c for c in ckpts if c.exists()]
        row = Row(self.run.name, "; ".join(parts), ckpt=max(present, key=mtime) if present else None,
                  job=next((j for j in jobs if j is not None), None),
                  updated=max((t for t in updated if t), default=None))
        row.checks = errors
        row.queued = "; ".join(queued)
        return row

    def _job_logs(self, job: Job | None, kind: str | None = None) -> list[Path]:
        if job is None:
            return []
        return [job.log(kind)] if kind else [job.log("out"), job.log("err")]

    def row(self) -> Row:
        d, cfg = self.run.dir, self.run.cfg
        p = cfg["pretrain"]
        if (d / "probes.json").is_file():
            return self.finished()
        if p["init"] == "checkpoint":
            backbone = Path(os.path.expanduser(p["checkpoint"]["path"]))
            if not backbone.is_file():
                return Row(self.run.name, f"waiting for input ({backbone}: no such file)")
        elif not (self.run.wdir / "backbone.pth").is_file():
            return self.inputs(["train"]) or self.pretraining()
        if "probe" not in cfg:
            return self.finished(probed=False)
        return self.inputs(["train", "val"]) or self.probing()

    def finished(self, probed: bool = True) -> Row:
        d, w = self.run.dir, self.run.wdir
        rows = metrics_rows(w / "metrics.csv")
        row = Row(self.run.name, "done", job=read_job(w), done=True)
        if rows:
            row.rate, row.step = rows[-1]["samples_per_s"], rows[-1]["step"]
            row.wall_s = rows[-1]["elapsed_s"]
        if probed:
            try:
                blob = json.loads((d / "probes.json").read_text())
                row.wall_s = (blob.get("pretrain_wall_s") or 0.0) + (blob.get("probe_wall_s") or 0.0)
            except (OSError, ValueError, AttributeError):
                pass
        row.updated = mtime(d / "probes.json") if probed else mtime(w / "backbone.pth")
        return row


def _logged_total(text: str) -> int | None:
    """N of the last 'step k/N' line pretraining printed; None when it printed none."""
    found = re.findall(r"^step \d+/(\d+)", text, flags=re.M)
    return int(found[-1]) if found else None


def _eta(rows: list[dict], total: int | None, batch: int) -> float | None:
    """Seconds left at the speed of the last RATE_WINDOW rows (elapsed_s), else of the last row's
    images/s; None without a total or a speed."""
    if total is None:
        return None
    done = rows[-1]["step"]
    timed = [r for r in rows[-RATE_WINDOW:] if r["elapsed_s"] is not None and r["step"] > 0]
    if len(timed) >= 2 and timed[-1]["elapsed_s"] > timed[0]["elapsed_s"] and timed[-1]["step"] > timed[0]["step"]:
        per_step = (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"]) / (timed[-1]["step"] - timed[0]["step"])
    elif rows[-1]["samples_per_s"]:
        per_step = batch / rows[-1]["samples_per_s"]
    else:
        return None
    return max(0, total - done) * per_step


def rows(run_list: list[Run], slurm: bool = True) -> list[Row]:
    """One Row per run; job states asked of SLURM once for all runs."""
    out = [_Inspector(r).row() for r in run_list]
    jobs = [r.job for r in out if r.job is not None]
    slurm_ids = [j.id for j in jobs if j.executor == "slurm"]
    states = slurm_states(slurm_ids) if slurm else {}
    for j in jobs:
        j.state = states.get(j.id, "-") if j.executor == "slurm" else local_state(j) if j.executor == "local" else "-"
    for row in out:  # failure needs the job's state (a live job has not failed)
        if row.queued and row.job is not None and row.job.state == "PENDING":
            row.stage = row.queued
        for label, logs, progress, job in row.checks:
            line = failure(logs, progress, job)
            if line:
                row.failed, row.stage, row.eta_s = line, f"failed ({label}): {line}", None
                break
    return out


def table(rows_: list[Row], now: float | None = None) -> str:
    now = time.time() if now is None else now
    body = []
    for r in rows_:
        age = now - mtime(r.ckpt) if r.ckpt is not None and mtime(r.ckpt) is not None and not r.done else None
        job = r.job
        requeues = job.requeues() if job is not None else None
        body.append([r.run, f"{r.rate:.0f}" if r.rate else "-", _fmt_age(r.eta_s) if not r.done else "-",
                     _fmt_age(r.wall_s), _fmt_age(age), _fmt_age(now - r.updated if r.updated else None),
                     job.id if job else "-", job.state if job else "-",
                     str(requeues) if requeues is not None else "-", r.stage])
    head = [c for c, _ in COLUMNS]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head) - 1)]
    lines = ["  ".join([*(x[i].ljust(widths[i]) for i in range(len(widths))), x[-1]]).rstrip() for x in [head, *body]]
    return "\n".join(lines)


def columns_help() -> str:
    """``--help``'s list of the columns."""
    import textwrap

    return "columns:\n" + "\n".join(textwrap.fill(what, 100, initial_indent=f"  {name:10s}", subsequent_indent=" " * 12)
                                     for name, what in COLUMNS)


def show(config_file: str | Path = "config.yaml", smoke: bool = False, watch: float | None = None,
         out=sys.stdout) -> int:
    """Print the table (again every ``watch`` seconds until Ctrl-C)."""
    run_list = runs(config_file, smoke)
    if not run_list:
        raise BadInput(f"{config_file}: no experiments")
    if not watch:
        out.write(table(rows(run_list)) + "\n")
        return 0
    # Ctrl-C sets a flag instead of raising KeyboardInterrupt: an exception raised while a destructor runs
    # (a file, a generator closed between two tables) is printed as "ignored" and lost, and the table went on
    # being printed (seen once under load: tests/test_status.py::test_watch_repeats_until_ctrl_c)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        while not stop.is_set():
            text = table(rows(run_list))
            if out.isatty():
                out.write("\033[H\033[2J")
            out.write(time.strftime("%Y-%m-%d %H:%M:%S") + f"  (every {watch:g} s; Ctrl-C stops)\n" + text + "\n")
            out.flush()
            stop.wait(watch)
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0
