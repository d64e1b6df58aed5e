"""What SLURM (and this machine) say about a stage's job before it is submitted and while it waits.

Before: a request no node can run stops with one line naming the ``launcher.<stage>`` setting
(``check_request``: partition, CPUs, memory, GPUs, nodes and time limit against ``sinfo``; without
sinfo, sbatch's refusal is translated the same way: ``refusal``); a local / inline stage that cannot
fit in this machine's memory is refused (``check_local_memory``). While waiting: the job's state
(``slurm_state``: sacct, squeue as fallback), and a pending reason that never goes away (a partition
limit, or a per-job / per-node limit of its QOS or association) cancels the job with one line
(``cancel_if_never_starts``, ``never_starts``). barlow.launch submits and waits; only these ask.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

from barlow.errors import BadInput

# Why a pending job would wait forever: its request exceeds what the partition allows (a cluster
# with EnforcePartLimits=NO, SLURM's default, accepts such a job instead of refusing it).
NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
                "InvalidQOS"}
# ... or exceeds a per-job or per-node maximum (or is below a minimum) of its QOS or association:
# e.g. QOSMaxWallDurationPerJobLimit, QOSMaxGRESPerJob, QOSMaxMemoryPerNode, AssocMaxCpuPerJobLimit,
# QOSMinCpuNotSatisfied (SLURM's job_reason_string; docs: job_reason_codes.html). Waiting never
# helps with these, unlike Grp*, *PerUser*, *PerAccount and AssocMaxJobsLimit / *SubmitJob* limits,
# which free up as other jobs end: those are not matched. A pattern, not a list: SLURM has ~60 such
# strings (one per TRES kind: Cpu, Node, Memory, GRES, BB, License, Billing, Energy, Minutes, ...).
QOS_ASSOC_NEVER = re.compile(r"^(?P<who>QOS|Assoc)(?:Max(?P<max>[A-Za-z]+?)Per(?P<per>Job|Node)(?:Limit)?"
                             r"|Min(?P<min>[A-Za-z]+?)(?:NotSatisfied)?)$")
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


def machine_mem_gb() -> float:
    """This machine's physical memory in GB (GiB, as SLURM counts), inf if unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("inf")


def check_local_memory(need_mem_gb: float | None, need_why: str, stage: str) -> None:
    """local / inline executors: refuse a stage that cannot fit in this machine's memory at all."""
    if need_mem_gb and need_mem_gb > machine_mem_gb():
        raise BadInput(f"launcher.{stage}: {need_why or 'the stage'} needs ~{need_mem_gb:,.0f} GB of memory, this "
                       f"machine has {machine_mem_gb():,.0f} GB; run it on a cluster (launcher.executor: slurm)")


def _count(text: str) -> int:
    m = re.match(r"\d+", text or "")
    return int(m.group()) if m else 0


def _minutes(limit: str) -> float:
    """SLURM time limit ('infinite', 'M:SS', 'H:MM:SS', 'D-HH:MM:SS', 'D-HH') in minutes."""
    if not limit or limit in ("infinite", "UNLIMITED", "n/a"):
        return float("inf")
    days, _, rest = limit.rpartition("-")
    try:
        nums = [int(x) for x in rest.split(":")]
        d = int(days) if days else 0
    except ValueError:
        return float("inf")
    if len(nums) == 1 and not days:
        return float(nums[0])  # SLURM reads a bare number as minutes
    if days and len(nums) < 3:
        nums += [0] * (3 - len(nums))  # D-HH, D-HH:MM
    h, m, sec = ([0] * (3 - len(nums)) + nums) if len(nums) <= 3 else (0, 0, 0)
    return d * 1440 + h * 60 + m + sec / 60


def sinfo_nodes() -> tuple[dict, str | None] | None:
    """{partition: {node: (cpus, mem_mb, gpus, time_limit_min)}} and the default partition, from
    sinfo; None if sinfo is missing or does not answer (then sbatch alone judges the request)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G|%l"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    parts: dict = {}
    default = None
    for line in out.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6:
            continue
        node, part, cpus, mem, gres, limit = fields
        if part.endswith("*"):
            part = part[:-1]
            default = part
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        parts.setdefault(part, {})[node] = (_count(cpus), _count(mem), gpus, _minutes(limit))
    return (parts, default) if parts else None


def check_request(launcher: dict, params: dict, stage: str, mem_why: str = "") -> None:
    """Refuse, before sbatch sees it, a request no node of the partition can ever run.

    Many clusters (EnforcePartLimits=NO, SLURM's default) accept such a job and leave it pending
    forever ("PartitionConfig"); a pipeline waiting on it would hang instead of saying what to fix.
    """
    info = sinfo_nodes()
    if info is None:
        return
    parts, default = info
    key = f"launcher.{stage}"
    asked = params.get("slurm_partition") or os.environ.get("SBATCH_PARTITION") or default
    if not asked:
        return
    names = [p.strip() for p in str(asked).split(",") if p.strip()]
    unknown = [p for p in names if p not in parts]
    if unknown:
        raise BadInput(f"{key}.partition {unknown[0]!r}: no such partition on this cluster (sinfo lists "
                       f"{', '.join(sorted(parts))}); set {key}.partition (or $SLURM_PARTITION) to one of them")
    nodes = {n: v for p in names for n, v in parts[p].items()}
    where = f"partition {'/'.join(names)}"
    tpn, cpt = params["tasks_per_node"], params["cpus_per_task"]
    cpus = tpn * cpt
    mem_mb = params["mem_gb"] * 1024 if params.get("mem_gb") else None
    gpus = launcher["gpus_per_node"]
    max_cpus = max(v[0] for v in nodes.values())
    if cpus > max_cpus:
        raise BadInput(f"{key}.cpus_per_task {cpt}: {cpus} CPUs per node (tasks_per_node {tpn} x cpus_per_task "
                       f"{cpt}), but the largest node in {where} has {max_cpus}; lower cpus_per_task or "
                       "tasks_per_node")
    if mem_why and mem_mb is not None and mem_mb > max(v[1] for v in nodes.values()):
        raise BadInput(f"{key}.mem_gb: not set, and {mem_why} needs ~{params['mem_gb']:g} GB per node, but the "
                       f"largest node in {where} has {max(v[1] for v in nodes.values()) / 1024:.1f} GB; spread it "
                       f"over more nodes ({key}.nodes), choose a partition with bigger nodes, or "
                       + ("use a probe pass without cached: true" if stage == "probe" else
                          "stage the train .beton to node-local disk (launcher.pretrain.setup) and set mem_gb"))
    if mem_mb is not None and mem_mb > max(v[1] for v in nodes.values()):
        raise BadInput(f"{key}.mem_gb {params['mem_gb']:g}: more memory per node than any node in {where} has "
                       f"({max(v[1] for v in nodes.values()) / 1024:.1f} GB); lower mem_gb")
    if gpus > max(v[2] for v in nodes.values()):
        raise BadInput(f"{key}.gpus_per_node {gpus}: the largest node in {where} has "
                       f"{max(v[2] for v in nodes.values())} GPUs; lower gpus_per_node or choose a GPU partition")
    longest = max(v[3] for v in nodes.values())
    if params["timeout_min"] > longest:
        raise BadInput(f"{key}.timeout_min {params['timeout_min']}: longer than the time limit of {where} "
                       f"({longest:g} min); lower timeout_min (the job requeues itself at the limit and resumes) "
                       "or choose a partition with a longer limit")
    fit = [n for n, (c, m, g, _) in nodes.items() if c >= cpus and (mem_mb is None or m >= mem_mb) and g >= gpus]
    if params["nodes"] > len(fit):
        raise BadInput(f"{key}.nodes {params['nodes']}: {where} has {len(fit)} node(s) that fit {cpus} CPUs"
                       f"{f' and {gpus} GPUs' if gpus else ''} each; lower nodes or choose a bigger partition")


def refusal(stderr: str, launcher: dict, stage: str, name: str) -> str:
    """One line for an sbatch refusal, naming the setting it most likely concerns."""
    said = []
    for line in stderr.splitlines():
        line = re.sub(r"^\s*(sbatch: )?(error: )?", "", line.strip())
        if line and line not in said:
            said.append(line)
    text = "; ".join(said) or "no reason given"
    key = f"launcher.{stage}"
    low = text.lower()
    for setting in ("partition", "account", "qos", "constraint"):
        if setting in low or (setting == "constraint" and "feature" in low):
            return (f"{key}.{setting} {launcher.get(setting)!r}: sbatch refused the {name} job ({text}); "
                    f"check it against `sinfo` / `sacctmgr show assoc user=$USER`")
    if "node count" in low:
        return f"{key}.nodes {launcher['nodes']}: sbatch refused the {name} job ({text}); check it against `sinfo`"
    return (f"{key}: sbatch refused the {name} job ({text}); check partition / nodes / cpus_per_task / mem_gb / "
            "gpus_per_node against `sinfo`")


def slurm_state(job_id: str) -> str:
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


def pending(job_id: str) -> tuple[str, str, str] | None:
    """(reason, qos, account) of a pending SLURM job; None if it is not pending (or squeue is silent)."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r|%q|%a"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = out.stdout.strip().split("|")
    if out.returncode != 0 or len(fields) != 4 or fields[0] != "PENDING":
        return None
    return fields[1], fields[2], fields[3]


# A QOS / association limit's resource word -> what sacctmgr calls that limit, and the launcher
# setting(s) that ask for the resource.
_LIMITED = {"Wall": ("MaxWall", ["timeout_min"]), "WallDuration": ("MaxWall", ["timeout_min"]),
            "Cpu": ("MaxTRES cpu", ["nodes", "tasks_per_node", "cpus_per_task"]), "Node": ("MaxTRES node", ["nodes"]),
            "Memory": ("MaxTRES mem", ["mem_gb"]), "Mem": ("MaxTRES mem", ["mem_gb"]),
            "GRES": ("MaxTRES gres", ["gpus_per_node"])}


def never_starts(reason: str, job_id: str, stage: str, qos: str = "", account: str = "") -> str:
    """One line saying why SLURM will never start this pending job and what to change; '' when the
    reason may still clear by waiting (Priority, Resources, a Grp* or per-user limit, ...)."""
    key = f"launcher.{stage}"
    if reason in NEVER_STARTS:
        return (f"{key}: SLURM would never start job {job_id} as asked (pending: {reason}), so it was cancelled; "
                "check partition / nodes / cpus_per_task / mem_gb / gpus_per_node / timeout_min / account / qos "
                "against `sinfo` and `sacctmgr`")
    m = QOS_ASSOC_NEVER.match(reason or "")
    if not m:
        return ""
    what = m["max"] or m["min"]
    base = what.removesuffix("Minutes")
    limit, settings = _LIMITED.get(base, (f"MaxTRES {base.lower()}", []))
    if what != base:  # a time x resource budget: MaxTRESMins
        limit, settings = limit.replace("MaxTRES ", "MaxTRESMins ").replace("MaxWall", "MaxTRESMins"), \
            ["timeout_min", *settings]
    if m["per"] == "Node":
        limit = limit.replace("MaxTRES ", "MaxTRESPerNode ")
    if m["min"]:
        limit = limit.replace("Max", "Min")
    scope = " per job" if m["per"] == "Job" else ""  # (MaxTRESPerNode says it itself)
    if m["who"] == "QOS":
        whose = f"QOS {qos!r}" if qos else "its QOS"
        other = f"another qos ({key}.qos; `sacctmgr show qos` lists the limits)"
    else:
        whose = f"association (account {account!r})" if account else "its association"
        other = f"another account ({key}.account; `sacctmgr show assoc user=$USER` lists the limits)"
    if m["per"] == "Job" and base in ("GRES", "Memory", "Mem"):
        settings = ["nodes", *settings]  # a per-job total: per node x nodes
    change = " / ".join(f"{key}.{s}" for s in settings) or "the request"
    verb = "raise" if m["min"] else "lower"
    return (f"{key}: SLURM will never start job {job_id}: {reason}, the {whose} limit {limit}{scope}, is "
            f"{'above' if m['min'] else 'below'} what the job asks, so it was cancelled; {verb} {change} or ask "
            f"for {other}")


def cancel_if_never_starts(job_id: str, stage: str) -> None:
    """A pending job whose reason never clears (``never_starts``): scancel it and raise that one line."""
    waiting = pending(job_id)
    why = never_starts(waiting[0], job_id, stage, *waiting[1:]) if waiting else ""
    if why:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
        raise BadInput(why)
