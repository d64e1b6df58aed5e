"""What a run's files say, read without torch, FFCV or submitit (``barlow.status`` shows them): the last
rows of metrics.csv, a log's one-line error, a .beton's sample count, a job's record and state.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

SLURM_TIMEOUT_S = 5.0
TAIL_BYTES = 64 * 1024     # of a log or metrics.csv: what is read
STALE_S = 2.0              # an error log this much older than the progress files is an old one
LIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
        "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "running"}


# ---- what the files hold ----------------------------------------------------------------------------
FFCV_HEADER = struct.Struct("<HHIQQ")  # ffcv.types.HeaderType: version, num_fields, page_size, num_samples, alloc ptr
FFCV_VERSION = 2


def beton_images(path: Path) -> int | None:
    """Samples in a .beton, from its header (FFCV's own reader does the same); None if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(FFCV_HEADER.size)
    except OSError:
        return None
    if len(head) < FFCV_HEADER.size:
        return None
    version, _, _, n, _ = FFCV_HEADER.unpack(head)
    return int(n) if version == FFCV_VERSION else None


def tail(path: Path, size: int = TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace")
    return text.split("\n", 1)[1] if end > size and "\n" in text else text  # (a cut first line dropped)


def metrics_rows(path: Path) -> list[dict]:
    """The last rows of metrics.csv (step, elapsed_s, samples_per_s as numbers; others as read)."""
    try:
        with open(path, newline="") as f:
            header = next(csv.reader([f.readline()]), [])
    except OSError:
        return []
    rows = []
    for cells in csv.reader(tail(path).splitlines()):
        if not cells or cells == header or len(cells) < len(header) - 4:
            continue
        row = dict(zip(header, cells))
        try:
            row["step"] = int(float(row["step"]))
            row["elapsed_s"] = float(row["elapsed_s"]) if row.get("elapsed_s") else None
            row["samples_per_s"] = float(row["samples_per_s"]) if row.get("samples_per_s") else None
        except (KeyError, ValueError):
            continue
        rows.append(row)
    return rows


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


ERROR_LINE = re.compile(r"^error: .+")
EXCEPTION_LINE = re.compile(r"^((?:[A-Za-z_]\w*\.)*\w*(?:Error|Exception|BadInput|Exit|Interrupt))(?:: (.*))?$")


def last_error(text: str) -> tuple[str, str]:
    """The log's one-line error as (kind, line): its last ``error: ...`` line (what ``python -m barlow``
    prints) as ("error", line), else the last exception line of a traceback as ("exception", line);
    ("", "") when there is neither. ``barlow.errors.BadInput: x`` reads ``error: x``."""
    lines = [line.rstrip() for line in text.splitlines()]
    for line in reversed(lines):
        if ERROR_LINE.match(line):
            return "error", line
    if not any(line.startswith("Traceback (most recent call last)") for line in lines):
        return "", ""
    for line in reversed(lines):
        m = EXCEPTION_LINE.match(line)
        if m:
            kind, said = m.group(1), m.group(2) or ""
            if kind.endswith("BadInput"):
                return "exception", f"error: {said}"
            return "exception", f"{kind.rsplit('.', 1)[-1]}: {said}".rstrip(": ")
    return "", ""


# ---- jobs -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    id: str
    executor: str
    folder: Path          # the folder holding job.json and submitit/
    state: str = "-"

    def log(self, kind: str) -> Path:
        return self.folder / "submitit" / f"{self.id}_0_log.{kind}"

    def requeues(self) -> int | None:
        text = ""
        try:
            text = self.log("out").read_text(errors="replace")
        except OSError:
            return None
        starts = text.count("Starting with JobEnvironment(")
        return max(0, starts - 1) if starts else None


def read_job(folder: Path) -> Job | None:
    try:
        blob = json.loads((folder / "job.json").read_text())
        return Job(str(blob["job_id"]), str(blob["executor"]), folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_states(ids: list[str]) -> dict[str, str]:
    """{job id: state} from one sacct call, squeue for the ids sacct does not know; {} without either."""
    states: dict[str, str] = {}
    if not ids:
        return states
    text = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(ids), "-o", "JobID,State"]) or ""
    for line in text.splitlines():
        jid, _, state = line.partition("|")
        if jid.strip() in ids and state.strip():
            states[jid.strip()] = state.split()[0].split("+")[0]
    missing = [i for i in ids if i not in states]
    if missing:
        for line in (_run(["squeue", "-h", "-j", ",".join(missing), "-o", "%i|%T"]) or "").splitlines():
            jid, _, state = line.partition("|")
            if jid.strip() in missing and state.strip():
                states[jid.strip()] = state.strip()
    return states


def local_state(job: Job) -> str:
    """A local (submitit LocalExecutor) job's id is its process id: running while that process is
    submitit's (Linux /proc); ended otherwise."""
    try:
        cmdline = Path(f"/proc/{int(job.id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return "ended" if Path("/proc/self").exists() else "-"
    return "running" if b"submitit" in cmdline else "ended"



def failure(logs: list[Path], progress: list[Path], job: Job | None) -> str:
    """The stage's one-line error, '' when it has none: read from ``logs`` that are not older than the
    stage's progress files (an older one is from an earlier attempt), unless its job is alive. An
    ``error:`` line wins (the stage's own words), then a traceback's exception line in the order of
    ``logs`` (the job's own stderr first: the launcher's traceback only says that the job failed)."""
    if job is not None and job.state in LIVE:
        return ""
    newest = max((t for t in map(mtime, progress) if t is not None), default=None)
    found = [last_error(tail(p)) for p in logs
             if mtime(p) is not None and (newest is None or mtime(p) >= newest - STALE_S)]
    return next((line for kind, line in found if kind == "error"), "") or \
        next((line for kind, line in found if kind == "exception"), "")
