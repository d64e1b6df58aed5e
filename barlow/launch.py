"""Run a stage through submitit and block until it ends, streaming the job's output.

Executors (``launcher.executor``): ``local`` (submitit's LocalExecutor: a child process on this
machine, the laptop default), ``slurm`` (sbatch; multi-node, one task per device), ``inline``
(this very process: handy for debugging). The model, loss and optimizer know nothing of this:
only this module touches submitit, and it asks SLURM only through barlow.preflight.

A stage's own error (BadInput, FloatingPointError) travels as a value: the job returns a
``StageError`` and this process raises the same one-line error from it (``_outcome``); anything
else a job dies of (a crash, an OOM kill, SLURM ending it) is one RuntimeError naming its log.

Failures are survivable at every level:
- a request no node can run (unknown partition, more CPUs / memory / GPUs / nodes / time than the
  partition has) stops before submitting, with one line naming the ``launcher.<stage>`` setting
  (``sinfo`` decides; without sinfo, sbatch's refusal is translated the same way); a job that pends
  for a reason that never goes away (a partition limit, or a per-job / per-node limit of its QOS or
  association, e.g. QOSMaxWallDurationPerJobLimit) is cancelled with one line naming the limit;
- timeout / preemption: the job is a ``submitit.helpers.Checkpointable``; SLURM signals it, submitit
  requeues it and the stage resumes from its last checkpoint (``launcher.max_requeues`` timeouts at
  most, see ``max_requeues``);
- one task crashes: srun runs with ``--kill-on-bad-exit=1``, so the step ends at once instead of the
  other ranks waiting in a collective for ever and holding the allocation;
- ``scontrol requeue`` / ``scancel`` / preemption by SLURM (a SIGTERM without submitit's USR2): the
  stage stops within a second instead of racing the SIGKILL; a requeued job resumes from the checkpoint;
- the launcher dies (login node reboot, Ctrl-C): the job id is recorded in ``<out_dir>/job.json``;
  the next launch finds the live job (``sacct``/``squeue``) and waits on it instead of submitting again;
- the job fails: the next launch submits a new one, which resumes from the checkpoint.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import submitit

from barlow import preflight, quick_exit
from barlow.atomic import write_json
from barlow.errors import BadInput

# Seconds a SLURM job waits after a SIGTERM for submitit's USR2 (its preemption protocol sends
# SIGTERM then USR2) before it stops: SIGTERM alone means SLURM is taking the allocation away.
SIGTERM_GRACE_S = 1.0


def _stop_on_sigterm() -> None:
    """Inside a SLURM job: stop soon after a SIGTERM instead of training on until the SIGKILL.

    submitit ignores SIGTERM (it waits for USR2, its timeout/preemption signal, to checkpoint and
    requeue). But a SIGTERM alone comes from ``scontrol requeue``, ``scancel``, a preemption by
    SLURM itself or the hard time limit: the allocation is going away in KillWait seconds whatever
    the job does. Training on would only race the kill (and could even finish a stage that SLURM
    then runs again). So: wait SIGTERM_GRACE_S for a USR2 (submitit's handler then requeues and
    exits as usual), else raise SystemExit; the next run resumes from the last checkpoint.
    """
    import signal

    def handler(signum, frame):
        print(f"SIGTERM: SLURM is ending this run of job {os.environ.get('SLURM_JOB_ID', '?')} (requeue, "
              "cancel or preemption); stopping, the next run resumes from the last checkpoint", flush=True)
        time.sleep(SIGTERM_GRACE_S)  # a USR2 arriving now runs submitit's checkpoint-and-requeue
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, handler)


# The errors a stage reports as one line (the CLI prints ``error: ...`` and exits 2, or 3 for a
# FloatingPointError such as a loss gone NaN): a job returns them as a StageError, not raised.
ONE_LINE = {"BadInput": BadInput, "FloatingPointError": FloatingPointError}


@dataclasses.dataclass(frozen=True)
class StageError:
    """A stage's own one-line error as the job's return value (picklable; see ``StageJob``): the
    waiting process raises ``exception()``, the same error with the same message, instead of
    reading it out of a remote traceback."""

    kind: str  # a key of ONE_LINE
    message: str
    rank: int = 0

    def exception(self) -> Exception:
        return ONE_LINE[self.kind](self.message)


def _exit_failed() -> None:
    """atexit, in a job whose stage returned a StageError: once submitit has saved that value, exit 1
    as the raised error did: SLURM records the job as FAILED and srun's --kill-on-bad-exit ends the
    other ranks at once instead of leaving them in their next collective."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _task_rank() -> int:
    try:
        return submitit.JobEnvironment().global_rank
    except RuntimeError:  # not in a submitit job
        return 0


class StageJob(submitit.helpers.Checkpointable):
    """A picklable stage call inside a job: ``fn(env=<this task's Env>)``.

    ``fn`` is any callable taking the task's ``env`` (rank, world, device), e.g. barlow.cli's ``StageCall``, which
    imports the stage only in the job: this module knows no stage. On timeout or
    preemption submitit calls ``checkpoint`` (inherited), which requeues the same call; the stage
    itself resumes from the checkpoint files it writes. A SIGTERM without submitit's USR2
    (``scontrol requeue``, ``scancel``) stops the stage within a second (``_stop_on_sigterm``).

    The stage's own errors (ONE_LINE) come back as a ``StageError`` value: the job's log still
    shows the traceback (``barlow status`` reads the error there) and the task still exits 1.
    """

    def __init__(self, fn: Callable[..., object], pg_timeout_min: float | None = None):
        self.fn, self.pg_timeout_min = fn, pg_timeout_min

    def __call__(self) -> str | StageError:
        quick_exit.install()  # (in the job's process: submitit's, whose exit would collect all of torch)
        try:
            return self.stage()
        except tuple(ONE_LINE.values()) as e:
            traceback.print_exc()
            atexit.register(_exit_failed)
            kind = next(k for k, t in ONE_LINE.items() if isinstance(e, t))
            return StageError(kind, str(e), _task_rank())

    def stage(self) -> str:
        """The stage in this process: its result as a string; its errors are raised (inline runs it so)."""
        from barlow import distributed

        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            _stop_on_sigterm()
        distributed.use_task_cpus()
        env = distributed.setup(timeout_min=self.pg_timeout_min)
        print(f"rank {env.rank}/{env.world} on {os.uname().nodename} "
              f"(SLURMD_NODENAME={os.environ.get('SLURMD_NODENAME', '-')}, device {env.device})", flush=True)
        try:
            return str(self.fn(env=env))
        finally:
            distributed.teardown()

    def checkpoint(self, *args, **kwargs):
        print("checkpoint requested (timeout or preemption): requeueing; the stage resumes from its last checkpoint",
              flush=True)
        return super().checkpoint(*args, **kwargs)


def complete(launcher: dict, stage: str) -> dict:
    """A copy of ``launcher`` checked against barlow/schemas/launcher.schema.yaml with its defaults filled
    in; the two the schema cannot hold depend on the machine and the executor."""
    from barlow import config

    out = config.validate(dict(launcher), config.HERE / "schemas" / "launcher.schema.yaml", f"launcher.{stage}",
                          fill=True)
    out.setdefault("cpus_per_task", os.cpu_count() or 1)
    # a local job's done() asks our own child process: poll it often (2 s of latency per stage
    # otherwise, benchmarks/README.md); SLURM's asks sacct, which must not be hammered
    out.setdefault("poll_s", 2.0 if out["executor"] == "slurm" else 0.1)
    return out


def _executor(launcher: dict, folder: Path, name: str, stage: str = "stage", need_mem_gb: float | None = None,
              need_why: str = "", expected_hours: float | None = None, notes: list | None = None):
    """The submitit executor for ``launcher``; its memory notes are printed, or appended to ``notes``
    (``run`` prints them once sbatch has accepted the job: a refused one prints only its error)."""
    launcher = complete(launcher, stage)
    kind = launcher["executor"]
    if kind not in ("slurm", "local"):
        raise BadInput(f"launcher.executor {kind!r}: unknown; use local, slurm or inline")
    if kind == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]  # submitit needs both
        if missing:
            raise BadInput(f"launcher.executor slurm: {' and '.join(missing)} not found on PATH; run on a SLURM "
                           "login node (or put SLURM's programs on PATH), or set launcher.executor: local")
    requeues = max_requeues(launcher, expected_hours)
    if launcher["max_requeues"] is None and expected_hours is not None and kind == "slurm":
        print(f"launcher.{stage}.max_requeues not set: allowing {requeues} timeouts (~{expected_hours:.3g} h "
              f"expected, timeout_min {launcher['timeout_min']})", flush=True)
    ex = submitit.AutoExecutor(folder=folder, cluster=kind, **{f"{kind}_max_num_timeout": requeues})
    params = dict(name=name, timeout_min=launcher["timeout_min"], nodes=launcher["nodes"],
                  tasks_per_node=launcher["tasks_per_node"], cpus_per_task=launcher["cpus_per_task"])
    if launcher["gpus_per_node"]:
        params["gpus_per_node"] = launcher["gpus_per_node"]
    later, notes = notes is not None, [] if notes is None else notes
    if launcher["mem_gb"]:
        params["mem_gb"] = float(launcher["mem_gb"])
        if need_mem_gb and params["mem_gb"] < need_mem_gb:
            notes.append(f"warning: launcher.{stage}.mem_gb {params['mem_gb']:g} is below the ~{need_mem_gb:,.0f} GB "
                         f"per node that {need_why or 'the stage'} needs (barlow.estimate); the job may be killed "
                         "for memory")
    derived = False
    if kind == "slurm":
        if need_mem_gb and not launcher["mem_gb"]:
            params["mem_gb"] = float(math.ceil(need_mem_gb))
            derived = True
            notes.append(f"launcher.{stage}.mem_gb not set: asking for {params['mem_gb']:g} GB per node "
                         f"({need_why or 'estimated need'})")
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            if launcher[key]:
                params[f"slurm_{key}"] = launcher[key]
        params["slurm_signal_delay_s"] = launcher["signal_delay_s"]
        if launcher["additional"]:
            params["slurm_additional_parameters"] = dict(launcher["additional"])
        # Slurm 22.05-23.02: srun no longer inherits sbatch's --cpus-per-task, so each task would be
        # pinned to one core; say it to srun explicitly (and through SRUN_CPUS_PER_TASK, which srun
        # reads from 22.05 on, for any srun a stage might start itself).
        cpt = params["cpus_per_task"]
        # --kill-on-bad-exit=1: a rank that exits non-zero (a crash, an OOM kill) ends the whole step
        # at once; without it the other ranks wait in their next collective (NCCL: for ever, or the
        # watchdog's 10 min) and hold every GPU of the allocation.
        params["slurm_srun_args"] = [f"--cpus-per-task={cpt}", "--kill-on-bad-exit=1"]
        params["slurm_setup"] = setup_lines(launcher, stage) + [f"export SRUN_CPUS_PER_TASK={cpt}"]
        preflight.check_request(launcher, params, stage, mem_why=need_why if derived else "")
    else:
        preflight.check_local_memory(need_mem_gb, need_why, stage)
    if kind == "local" and params["nodes"] > 1:
        raise BadInput(f"launcher.{stage}.nodes {params['nodes']}: > 1 needs launcher.executor: slurm "
                       "(the local executor runs on one machine)")
    if not later:
        for note in notes:
            print(note, flush=True)
    ex.update_parameters(**params)
    return ex


# launcher.max_requeues when neither it nor the expected wall time is given: generous, since running
# out ends a long run half-way ("timed-out too many times"), while one too many only lets a job that
# makes no progress requeue a few more times.
DEFAULT_MAX_REQUEUES = 20


def max_requeues(launcher: dict, expected_hours: float | None = None) -> int:
    """How many timeouts submitit requeues the job after (its ``max_num_timeout``; submitit's own default
    is 3): ``launcher.max_requeues`` if set, else derived from ``expected_hours``, the stage's expected
    wall time, else DEFAULT_MAX_REQUEUES.

    Derived: ceil(expected_hours x 60 / timeout_min x 1.5) + 2. A run needs ~expected / timeout_min
    allocations; the 1.5 covers an estimate that is optimistic (it assumes perfect scaling, no data
    stalls, evaluation or checkpoint time) and the work each requeue repeats (start-up, and the steps
    since the last checkpoint); the + 2 covers short runs, where one stray timeout is a large share.

    What counts (submitit 1.5, core/job_environment.py ``SignalHandler.checkpoint_and_try_requeue``):
    only timeouts. On SLURM's USR2 (sent ``signal_delay_s`` before the time limit, and by a
    preemption) rank 0 checkpoints and requeues the job; the signal counts as a timeout when the
    allocation has run at least min(80 % of timeout_min, timeout_min - 10 min), else as a preemption,
    which costs nothing and is never limited. After max_num_timeout timeouts the next one ends the
    job ("timed-out too many times"). A preemption late in an allocation is therefore counted as a
    timeout. A SIGTERM without USR2 (``scontrol requeue``, a preemption by SLURM itself: see
    ``_stop_on_sigterm``) is requeued by SLURM, not submitit, and is not counted either.
    """
    if launcher.get("max_requeues") is not None:
        return int(launcher["max_requeues"])
    if expected_hours is None or not math.isfinite(expected_hours) or expected_hours < 0:
        return DEFAULT_MAX_REQUEUES
    return math.ceil(expected_hours * 60 / launcher["timeout_min"] * 1.5) + 2


def setup_lines(launcher: dict, stage: str = "stage") -> list[str]:
    """The sbatch script's lines before srun: ``launcher.setup`` as written (``module load ...``), then
    one ``export K=V`` per ``launcher.env`` entry (after the setup, so a module that sets the same
    variable does not override the user's value). srun passes the batch script's environment on to
    every task (its default, ``--export=ALL``)."""
    lines = list(launcher.get("setup") or [])
    for key, value in (launcher.get("env") or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):  # the schema says so too; this guards direct callers
            raise BadInput(f"launcher.{stage}.env: {key!r} is not a variable name (letters, digits and _, "
                           "not starting with a digit)")
        lines.append(f"export {key}={shlex.quote(str(value))}")
    return lines


def run(fn: Callable[..., object], launcher: dict, out_dir: str | Path, name: str, *, stage: str,
        need_mem_gb: float | None = None, need_why: str = "", expected_hours: float | None = None):
    """Run ``fn(env=...)`` as a job (see ``StageJob``), re-attaching to a live SLURM job of an earlier
    launch where there is one. ``stage`` names the ``launcher.<stage>`` section in messages.

    ``need_mem_gb``: host memory per node the stage needs (e.g. ``estimate.probe_memory_gb``), with
    ``need_why`` saying what needs it. On SLURM it becomes the job's mem_gb when launcher.<stage>.mem_gb
    is not set, and a request no node of the partition can hold is refused before submitting; a
    smaller mem_gb set by the user gets a warning; local / inline runs are refused when this machine
    has less memory in all.

    ``expected_hours``: the stage's expected wall time (e.g. ``barlow.estimate``'s ``wall_hours``);
    without launcher.<stage>.max_requeues it sets how many timeouts the job may requeue after
    (``max_requeues``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    launcher = complete(launcher, stage)
    call = StageJob(fn, launcher["pg_timeout_min"])
    if launcher["executor"] == "inline":
        preflight.check_local_memory(need_mem_gb, need_why, stage)
        return call.stage()
    record = out_dir / "job.json"
    folder = out_dir / "submitit"
    job = None
    if record.is_file() and launcher["executor"] == "slurm":
        old = json.loads(record.read_text())
        state = preflight.slurm_state(old["job_id"])
        if state in preflight.LIVE_STATES:
            print(f"re-attaching to SLURM job {old['job_id']} ({state}) from an earlier launch", flush=True)
            job = submitit.SlurmJob(folder=folder, job_id=old["job_id"], tasks=tuple(range(old.get("tasks", 1))))
        else:
            print(f"earlier job {old['job_id']} is {state or 'gone'}; submitting a new one (it resumes from the checkpoint)",
                  flush=True)
    if job is None:
        notes: list = []
        ex = _executor(launcher, folder, name, stage, need_mem_gb=need_mem_gb, need_why=need_why,
                       expected_hours=expected_hours, notes=notes)
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):  # submitit echoes sbatch's stderr on failure
                job = ex.submit(call)
        except Exception as e:  # noqa: BLE001 - submitit wraps sbatch's refusal in several types
            if launcher["executor"] != "slurm":
                sys.stderr.write(captured.getvalue())
                raise
            said = getattr(e, "stderr", None) or str(e) or captured.getvalue() or type(e).__name__
            if isinstance(said, bytes):
                said = said.decode(errors="replace")
            raise BadInput(preflight.refusal(said, launcher, stage, name)) from None
        for note in notes:
            print(note, flush=True)
        tasks = launcher["nodes"] * launcher["tasks_per_node"]
        write_json(record, {"job_id": str(job.job_id), "executor": launcher["executor"],
                            "tasks": tasks, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"submitted {name} as job {job.job_id} ({launcher['executor']}); "
              f"logs: {folder}", flush=True)
    return _wait(job, poll=float(launcher["poll_s"]), stage=stage)


def _wait(job, poll: float, stage: str = "stage"):
    """Block until the job ends, echoing new output of every task (rank) as it comes: rank 0's as
    is, the others' line by line prefixed "[rank k]" (their errors would otherwise only be in
    submitit's per-task logs). A requeued job appends to the same files; echoing goes on."""
    tasks = [job.task(i) for i in range(job.num_tasks)]
    offsets: dict = {}
    pending: dict = {}

    def pump(final: bool = False) -> int:
        got = 0
        for rank, sub in enumerate(tasks):
            for key, path in (("out", sub.paths.stdout), ("err", sub.paths.stderr)):
                try:
                    with open(path, "r", errors="replace") as f:
                        f.seek(offsets.get((rank, key), 0))
                        chunk = f.read()
                        offsets[rank, key] = f.tell()
                except FileNotFoundError:
                    continue
                got += len(chunk)
                stream = sys.stdout if key == "out" else sys.stderr
                if rank:
                    text = pending.get((rank, key), "") + chunk
                    lines = text.split("\n")
                    rest = lines.pop()  # an unfinished line waits for its end
                    if final and rest:
                        lines.append(rest)
                        rest = ""
                    pending[rank, key] = rest
                    chunk = "".join(f"[rank {rank}] {line}\n" for line in lines)
                if chunk:
                    stream.write(chunk)
                    stream.flush()
        return got

    slurm = isinstance(job, submitit.SlurmJob)

    def finished() -> bool:
        if not job.done():
            return False
        if not slurm or all(t.paths.result_pickle.exists() for t in tasks):
            return True
        # submitit's watcher calls a SUSPENDED job (or one whose state sacct has not caught up
        # with yet) done: believe it only once SLURM no longer lists the job as live.
        return preflight.slurm_state(str(job.job_id)) not in preflight.LIVE_STATES

    next_check = time.monotonic() + 10
    while not finished():
        pump()
        if slurm and time.monotonic() > next_check:
            next_check = time.monotonic() + 30
            preflight.cancel_if_never_starts(str(job.job_id), stage)
        time.sleep(poll)
    try:
        return _outcome(job, tasks)
    finally:
        # the job's last lines can reach its log files a moment after its result: echo until quiet
        deadline = time.monotonic() + 5
        while pump() and time.monotonic() < deadline:
            time.sleep(min(poll, 0.5))
        pump(final=True)


def _outcome(job, tasks):
    """Rank 0's return value. Ranks are read in order, as submitit's ``job.results()`` reads them, and
    the first that did not succeed decides: a StageError (the stage's own error, a value: see
    ``StageJob``) is raised as its one line, a crash that is not ours as one RuntimeError naming the log."""
    values = []
    for rank, task in enumerate(tasks):
        try:
            value = task.result()
        except submitit.core.utils.FailedJobError:  # (first: it is a subclass of UncompletedJobError)
            raise RuntimeError(f"job {job.job_id} failed; its log: {tasks[0].paths.stderr}") from None
        except submitit.core.utils.UncompletedJobError as e:
            _killed(job, tasks, rank, e)
        if isinstance(value, StageError):
            raise value.exception() from None
        values.append(value)
    return values[0]


def _killed(job, tasks, rank: int, e: Exception) -> None:
    """Raise why rank ``rank`` ended without a result: killed by srun's --kill-on-bad-exit when a later
    rank failed first (that rank's error is the one to show), else by SLURM (time limit, cancel, node
    failure)."""
    for later, task in enumerate(tasks[rank + 1:], start=rank + 1):
        try:
            value = task.result()
        except submitit.core.utils.FailedJobError as failed:
            raise RuntimeError(f"job {job.job_id} failed on rank {later} ({_last_line(failed)}), which ended the "
                               f"other ranks; its log: {task.paths.stderr}") from None
        except Exception:  # noqa: BLE001 - no result of this rank either: look further
            continue
        if isinstance(value, StageError):
            raise value.exception() from None
    raise RuntimeError(f"job {job.job_id} ended without a result ({str(e).splitlines()[0]}); "
                       f"see {tasks[0].paths.stderr}; rerun to resume from its checkpoint") from None


def _last_line(e: Exception) -> str:
    """The exception line of a remote traceback ("RuntimeError: ..."; submitit appends log paths): what
    a crash that is not ours (a StageError is a value) is named by."""
    lines = [line.strip() for line in str(e).splitlines() if re.match(r"[A-Za-z_][\w.]*: \S", line.strip())]
    return lines[-1] if lines else "see its log"
