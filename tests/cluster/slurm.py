"""A real SLURM cluster on this one host, for tests (Debian 12, slurm-wlm 22.05, run as root).

What it runs (no systemd needed):
  munged (as user munge, key /etc/munge/munge.key, socket under /run/munge), unless one answers already
  mariadbd (via setsid, bound to 127.0.0.1, its own datadir under the state dir)
  slurmdbd (so ``sacct`` works), slurmctld, and one ``slurmd -N nX`` per node (Debian builds slurmd
  with multiple-slurmd support).
Every TCP port (slurmctld, slurmdbd, each slurmd, mariadbd) is picked free at each cold start (bind
to port 0) and written into the generated configuration; ``Cluster.ports`` has them.

Nodes ``n1..nN`` (CPUs=2, RealMemory=4000 each) all resolve to 127.0.0.1 (a line appended to
/etc/hosts for the names that do not already); partitions ``debug`` (default, no time limit) and
``short`` (MaxTime=00:05:00), both with all nodes; QOS and association limits are enforced
(AccountingStorageEnforce=limits; root has the cluster's default association). The configuration
is written to /etc/slurm (slurm.conf, slurmdbd.conf), where Debian's clients look by default, so
sbatch/srun/sinfo/sacct (and submitit, Snakemake's SLURM plugin) work with no environment;
:meth:`Cluster.env` still returns ``SLURM_CONF``.

Leaving the machine as it was found: before it changes anything outside its state dir, the harness
writes down what it is about to change in a journal in the state dir (``restore.json``, plus byte
copies of any /etc/slurm file it overwrites, e.g. a real cluster's slurm.conf). ``stop()`` stops every
daemon it started (munged only if it started it), puts /etc/hosts and /etc/slurm back byte for byte
(owner, mode and mtime too; /etc/hosts in place, as it may be a bind mount), removes what it created
outside the state dir (the munge key and munge's run/state/log dirs and files: only those that did
not exist before), and finally the whole state dir (``$BARLOW_SLURM_STATE``, default
/var/lib/barlow-slurm: spool, slurmctld state, the MariaDB datadir, logs; save_logs() copies the logs
out first). A run killed outright (SIGKILL) leaves the journal behind: the next start() or
``python -m tests.cluster.slurm stop`` replays it first.

Nothing is installed here: the Debian packages (PACKAGES) come from ``make test`` / ``make
test-slurm`` (the Makefile's apt-slurm stamp); start() raises SlurmNotInstalled if a program is missing.

API::

    cluster = start(nodes=2)    # idempotent: returns at once if the same cluster is up and healthy
    start(nodes=2, hold=True)   # ... and registers this process as a user; release() drops that and
    release()                   #     stops the cluster when no live user is left (unless keep=True)
    cluster.wait_job(job_id, timeout=60) -> final state
    cluster.sacct_states(job_id) -> ["REQUEUED", "COMPLETED"] (every run of the job, oldest first)
    stop()                      # stop every daemon and restore the machine (above)
    etc_snapshot()              # /etc/hosts and /etc/slurm as bytes + owner/mode, to compare

A *cold* start (nothing healthy running, or another cluster) stops and undoes an earlier run first,
so job ids restart at 1 and accounting starts empty: tests must use a fresh submitit folder (e.g.
under pytest's tmp_path) and never reuse one across runs, or submitit may read files of an older job
with the same id.

CLI for humans: ``python -m tests.cluster.slurm start [--nodes N] | stop | status``. A cluster
started by the CLI is marked keep-running: test sessions reuse it and leave it up.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

STATE_DIR = Path(os.environ.get("BARLOW_SLURM_STATE", "/var/lib/barlow-slurm"))
CONF_DIR = Path("/etc/slurm")
SLURM_CONF = CONF_DIR / "slurm.conf"
SLURMDBD_CONF = CONF_DIR / "slurmdbd.conf"
HOSTS = Path("/etc/hosts")
CLUSTER_NAME = "barlow"
MAX_NODES = 16
CPUS_PER_NODE = 2
REAL_MEMORY_MB = 4000
DEF_MEM_PER_CPU_MB = 1000
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
DB_PASS = "barlow-test-only"  # a throwaway database bound to 127.0.0.1

# installed by `make test` / `make test-slurm` (Makefile: SLURM_APT_PKGS, stamp apt-slurm), never here
PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server"]
BINARIES = ["munged", "munge", "unmunge", "mariadbd", "mariadb-install-db", "mariadb", "mariadb-admin",
            "slurmdbd", "slurmctld", "slurmd", "sinfo", "squeue", "scontrol", "sbatch", "srun", "sacct",
            "sacctmgr", "scancel"]

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
MUNGE_PID = MUNGE_RUN / "munged.pid"
MUNGE_DIRS = ((MUNGE_KEY.parent, 0o700), (MUNGE_RUN, 0o755), (Path("/var/lib/munge"), 0o711),
              (Path("/var/log/munge"), 0o700))
MUNGE_FILES = (MUNGE_KEY, MUNGE_PID, Path("/var/lib/munge/munged.seed"), Path("/var/log/munge/munged.log"))

# node states that count as "up" (the cluster is healthy) and as "free" (idle)
_UP_STATES = {"idle", "mixed", "allocated", "completing"}
_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
             "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be had on this machine at all (not root)."""


class SlurmNotInstalled(RuntimeError):
    """A program of PACKAGES is missing: `make test` / `make test-slurm` install them, tests do not."""


class SlurmError(RuntimeError):
    """The cluster failed to start or answer; the message carries the daemons' log tails."""


# ----------------------------------------------------------------------------- paths


def _p(*parts: str) -> Path:
    return STATE_DIR.joinpath(*parts)


RUN_DIR = _p("run")
LOG_DIR = _p("log")
CTLD_STATE = _p("ctld")
SPOOL_DIR = _p("spool")
MYSQL_DIR = _p("mysql")
MYSQL_RUN = _p("mysql-run")
MYSQL_SOCK = MYSQL_RUN / "mysqld.sock"
MYSQL_PID = MYSQL_RUN / "mysqld.pid"
FINGERPRINT = _p("fingerprint.json")
PORTS_FILE = _p("ports.json")  # the ports picked at the last cold start
JOURNAL = _p("restore.json")  # what was changed outside the state dir, to undo it (module docstring)
BACKUP_DIR = _p("restore")  # byte copies of the files the journal will put back
LOCK_FILE = _p("lock")
USERS_DIR = _p("users")  # one file per process that holds the cluster (start(hold=True))
KEEP_MARKER = _p("keep-running")  # written by start(keep=True), e.g. the CLI: release() won't stop it


def _node_names(nodes: int, prefix: str = "n") -> List[str]:
    return [f"{prefix}{i}" for i in range(1, nodes + 1)]


# ----------------------------------------------------------------------------- ports


def _free_ports(count: int) -> List[int]:
    """count distinct TCP ports that nothing listens on now (bound to port 0 on every address,
    all held open together so they differ, then closed for the daemons to take)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pick_ports(nodes: List[str]) -> Dict[str, object]:
    ctld, dbd, mysql, *slurmd = _free_ports(3 + len(nodes))
    return {"slurmctld": ctld, "slurmdbd": dbd, "mariadb": mysql, "slurmd": dict(zip(nodes, slurmd))}


def _ports() -> Dict[str, object]:
    """The ports of the last cold start ({} if none is recorded)."""
    try:
        return json.loads(PORTS_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _all_ports(ports: Dict[str, object]) -> List[int]:
    return [p for k, p in ports.items() if k != "slurmd"] + list(ports.get("slurmd", {}).values())


def _slurmd_pidfile(node: str) -> Path:
    return RUN_DIR / f"slurmd-{node}.pid"


# ----------------------------------------------------------------------------- processes


def _log(msg: str) -> None:
    if os.environ.get("BARLOW_SLURM_QUIET") != "1":
        print(f"[slurm-harness] {msg}", file=sys.stderr, flush=True)


def _pid_alive(pid: Optional[int]) -> bool:
    """True if the process exists and is not a zombie (PID 1 here reaps orphans slowly)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _runs(pid: int, binary: str) -> bool:
    """True if the process's program is binary (argv[0], as a path or not; Debian's -wlm names too)."""
    argv0 = _cmdline(pid).split(" ", 1)[0]
    return os.path.basename(argv0) in (binary, f"{binary}-wlm")


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pid_of(pidfile: Path, binary: str) -> Optional[int]:
    """The live pid recorded in pidfile if its command line names binary (guards against pid reuse)."""
    pid = _read_pid(pidfile)
    if pid and _pid_alive(pid) and _runs(pid, binary):
        return pid
    return None


def _listening_pids(port: int) -> List[int]:
    """Pids of the processes holding a listening TCP socket on port (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        pids.append(int(proc.name))
                        break
        except OSError:
            continue
    return pids


def _terminate(pids: Sequence[int], what: str, timeout: float = 10.0) -> None:
    """SIGTERM the given pids, then SIGKILL whatever is still alive after timeout."""
    pids = [p for p in pids if _pid_alive(p)]
    if not pids:
        return
    _log(f"stopping {what} (pid {', '.join(map(str, pids))})")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _pid_alive(pid):
            _log(f"{what} pid {pid} ignored SIGTERM: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.05)


def _stop_daemon(pidfile: Path, binary: str, ports: Sequence[int] = (), timeout: float = 10.0) -> None:
    """Stop one of our daemons: by its pid file, and by whoever of that binary holds its ports."""
    pids = []
    pid = _pid_of(pidfile, binary)
    if pid:
        pids.append(pid)
    for port in ports:
        pids += [p for p in _listening_pids(port) if _runs(p, binary) and p not in pids]
    _terminate(pids, binary, timeout)
    with contextlib.suppress(OSError):
        pidfile.unlink()


def _daemon_env() -> Dict[str, str]:
    """The environment for daemons: ours, less anything from an enclosing SLURM job."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SUBMITIT_"))}


def _run(cmd: Sequence[str], timeout: float = 30, check: bool = True, input: Optional[str] = None,
         **kw) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input,
                             **kw)
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{' '.join(cmd)} did not answer in {timeout} s") from exc
    if check and res.returncode != 0:
        said = res.stderr.strip() or res.stdout.strip()
        raise SlurmError(f"{' '.join(cmd)} exited {res.returncode}: {said}")
    return res


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(cond, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() > deadline:
            raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{_log_tails()}")
        time.sleep(interval)


def _log_tails(lines: int = 15) -> str:
    out = []
    for log in sorted(LOG_DIR.glob("*.log")) if LOG_DIR.exists() else []:
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log} ---\n" + "\n".join(tail))
    return "\n".join(out)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise start/stop between processes (two pytest runs, the CLI)."""
    while True:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with open(LOCK_FILE, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                same = os.fstat(fh.fileno()).st_ino == LOCK_FILE.stat().st_ino
            except OSError:
                same = False
            if not same:  # stop() removed the state dir (and this lock file) while we waited
                continue
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
            return


# ----------------------------------------------------------------------------- installing


_SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"


def _bin(name: str) -> str:
    """Full path of a program (daemons live in /usr/sbin, which a PATH may lack)."""
    return shutil.which(name, path=_SEARCH_PATH) or name


def _missing_binaries() -> List[str]:
    return [b for b in BINARIES if shutil.which(b, path=_SEARCH_PATH) is None]


def require_installed() -> None:
    """Raise SlurmNotInstalled (saying what to run) if a program the cluster needs is missing."""
    missing = _missing_binaries()
    if missing:
        raise SlurmNotInstalled(
            f"the SLURM test cluster's programs are missing ({', '.join(missing)}): run `make test` or "
            f"`make test-slurm` (as root), which install the Debian packages {' '.join(PACKAGES)} first; "
            f"the tests themselves install nothing")


# ----------------------------------------------------------------------------- configuration


def _slurm_conf(nodes: List[str], ports: Dict[str, object], accounting: bool = True) -> str:
    host = socket.gethostname().split(".")[0]
    node_lines = "\n".join(
        f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports['slurmd'][n]} "
        f"CPUs={CPUS_PER_NODE} RealMemory={REAL_MEMORY_MB} State=UNKNOWN"
        for n in nodes)
    # AccountingStorageEnforce=limits: QOS and association limits hold, as on a real site (a job over a
    # QOS's MaxWall pends with QOSMaxWallDurationPerJobLimit instead of running); it implies
    # "associations", which root (the tests' user) has from the cluster's registration.
    acct = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
            f"AccountingStoragePort={ports['slurmdbd']}\nAccountingStorageEnforce=limits" if accounting
            else "AccountingStorageType=accounting_storage/none")
    all_nodes = ",".join(nodes)
    return f"""\
# Written by tests/cluster/slurm.py (a one-host test cluster); rewritten on every cold start.
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ports['slurmctld']}
AuthType=auth/munge
# a requeued job may start again only after the credential expired (default 120 s; 5 is the minimum)
AuthInfo=cred_expire=5
CryptoType=crypto/munge
StateSaveLocation={CTLD_STATE}
SlurmdSpoolDir={SPOOL_DIR}/%n
SlurmctldPidFile={RUN_DIR}/slurmctld.pid
SlurmdPidFile={RUN_DIR}/slurmd-%n.pid
SlurmctldLogFile={LOG_DIR}/slurmctld.log
SlurmdLogFile={LOG_DIR}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
# No CPU binding (task/none): every node runs on this one host's cores and binds to the cores *it*
# allocated, so with task/affinity two nodes' tasks stack on the same host core (both nodes' first
# core is the host's core 0), and a multi-node step inherits the batch script's mask (SLURM_CPU_BIND)
# on every node. A step's CPU count is still SLURM's to account (sacct AllocCPUS of the step).
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
LaunchType=launch/slurm
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job that asks no memory takes the whole node
DefMemPerCPU={DEF_MEM_PER_CPU_MB}
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
MinJobAge=300
ReturnToService=2
KillWait=10
InactiveLimit=0
JobRequeue=1
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{acct}
{node_lines}
PartitionName=debug Nodes={all_nodes} Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes={all_nodes} MaxTime=00:05:00 State=UP
"""


def _slurmdbd_conf(ports: Dict[str, object]) -> str:
    return f"""\
# Written by tests/cluster/slurm.py (a one-host test cluster).
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports['slurmdbd']}
SlurmUser=root
DebugLevel=info
LogFile={LOG_DIR}/slurmdbd.log
PidFile={RUN_DIR}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadb']}
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
"""


def _fingerprint(nodes: List[str], ports: Dict[str, object], accounting: bool) -> str:
    h = hashlib.sha256((_slurm_conf(nodes, ports, accounting) + _slurmdbd_conf(ports)).encode()).hexdigest()
    return json.dumps({"nodes": nodes, "accounting": accounting, "conf_sha256": h})


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file atomically (the state dir's files; /etc/slurm's through _write_etc)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the journal
#
# Everything the harness changes outside its state dir is written down *before* it is changed, so
# stop() (or the next run, after a SIGKILL) can undo it exactly.


def _journal() -> Dict[str, object]:
    try:
        return json.loads(JOURNAL.read_text())
    except (OSError, ValueError):
        return {}


def _journal_set(**changes: object) -> None:
    j = _journal()
    j.update(changes)
    _write(JOURNAL, json.dumps(j, indent=1), mode=0o600)


def _journal_append(key: str, value: object) -> None:
    j = _journal()
    _journal_set(**{key: list(j.get(key, [])) + [value]})


def _mkdir_noted(d: Path, mode: Optional[int] = None, owner: Optional[pwd.struct_passwd] = None) -> None:
    """mkdir -p d; the topmost folder it creates is journaled (stop() removes it)."""
    if d.exists():
        return
    top = d
    while not top.parent.exists():
        top = top.parent
    _journal_append("created_dirs", str(top))
    d.mkdir(parents=True)
    if owner is not None:
        os.chown(d, owner.pw_uid, owner.pw_gid)
    if mode is not None:
        os.chmod(d, mode)


def _note_file(path: Path) -> None:
    """Journal path as it is now (absent, a symlink, or a byte copy with owner/mode/times), once."""
    j = _journal()
    files = dict(j.get("files", {}))
    if str(path) in files:
        return
    try:
        st = path.lstat()
    except FileNotFoundError:
        rec: Dict[str, object] = {"existed": False}
    else:
        if path.is_symlink():
            rec = {"existed": True, "symlink": os.readlink(path)}
        else:
            BACKUP_DIR.mkdir(parents=True, exist_ok=True)
            backup = hashlib.sha256(str(path).encode()).hexdigest()[:16]
            shutil.copyfile(path, BACKUP_DIR / backup)
            rec = {"existed": True, "backup": backup, "mode": st.st_mode & 0o7777, "uid": st.st_uid,
                   "gid": st.st_gid, "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns}
    files[str(path)] = rec
    _journal_set(files=files)


def _write_etc(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file outside the state dir (/etc/slurm), journaling what it replaces first."""
    _mkdir_noted(path.parent)
    _note_file(path)
    _write(path, text, mode)


def _ensure_hosts(nodes: List[str]) -> None:
    """Make the node names resolve to 127.0.0.1 (torch's master address is the first node name)."""
    data = HOSTS.read_bytes() if HOSTS.exists() else b""
    known = set()
    for line in data.decode(errors="replace").splitlines():
        parts = line.split("#", 1)[0].split()
        if parts and parts[0] == "127.0.0.1":
            known.update(parts[1:])
    missing = [n for n in nodes if n not in known]
    if missing:
        sep = "" if data.endswith(b"\n") or not data else "\n"
        added = f"{sep}127.0.0.1 {' '.join(missing)}  # SLURM test cluster of tests/cluster/slurm.py\n"
        if not HOSTS.exists():
            _note_file(HOSTS)
        _journal_append("hosts_added", added)
        with open(HOSTS, "ab") as fh:  # append in place: /etc/hosts may be a bind mount
            fh.write(added.encode())
        _log(f"/etc/hosts: added 127.0.0.1 {' '.join(missing)}")


def _restore_file(path: Path, rec: Dict[str, object]) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.with_name(path.name + ".tmp").unlink()
    if not rec.get("existed"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    if "symlink" in rec:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.symlink(str(rec["symlink"]), path)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes((BACKUP_DIR / str(rec["backup"])).read_bytes())
    os.chown(tmp, int(rec["uid"]), int(rec["gid"]))
    os.chmod(tmp, int(rec["mode"]))
    os.utime(tmp, ns=(int(rec["atime_ns"]), int(rec["mtime_ns"])))
    os.replace(tmp, path)


def _restore_hosts(added: List[str]) -> None:
    """Take out exactly the lines the harness appended (last first), writing /etc/hosts in place."""
    if not added or not HOSTS.exists():
        return
    before = data = HOSTS.read_bytes()
    for block in reversed(added):
        b = block.encode()
        i = data.rfind(b)
        if i < 0:
            _log(f"/etc/hosts: the line we added is gone already: {block.strip()!r}")
            continue
        data = data[:i] + data[i + len(b):]
    if data != before:
        with open(HOSTS, "r+b") as fh:
            fh.write(data)
            fh.truncate()
        _log("/etc/hosts: restored")


def _undo_journal() -> List[str]:
    """Undo what the journal lists (daemons must be stopped already); returns the errors, if any."""
    j = _journal()
    errors = []
    try:
        _restore_hosts(list(j.get("hosts_added", [])))
    except OSError as exc:
        errors.append(f"/etc/hosts: {exc}")
    for path, rec in dict(j.get("files", {})).items():
        try:
            if Path(path) != HOSTS:
                _restore_file(Path(path), rec)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    for path in j.get("created_files", []):
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
    for d in reversed(list(j.get("created_dirs", []))):
        shutil.rmtree(d, ignore_errors=True)
        if Path(d).exists():
            errors.append(f"{d}: could not remove it")
    hosts_rec = dict(j.get("files", {})).get(str(HOSTS))
    if hosts_rec and not hosts_rec.get("existed") and HOSTS.exists() and not HOSTS.read_bytes():
        HOSTS.unlink()
    return errors


def etc_snapshot() -> Dict[str, object]:
    """/etc/hosts and everything under /etc/slurm: kind, sha256, owner and mode (None if absent)."""
    snap: Dict[str, object] = {}
    paths = [HOSTS, CONF_DIR] + (sorted(CONF_DIR.rglob("*")) if CONF_DIR.is_dir() else [])
    for path in paths:
        try:
            st = path.lstat()
        except FileNotFoundError:
            snap[str(path)] = None
            continue
        if path.is_symlink():
            snap[str(path)] = ("symlink", os.readlink(path))
        elif path.is_dir():
            snap[str(path)] = ("dir", oct(st.st_mode & 0o7777), st.st_uid, st.st_gid)
        else:
            snap[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size,
                               oct(st.st_mode & 0o7777), st.st_uid, st.st_gid)
    return snap


# ----------------------------------------------------------------------------- munge


def _munge_ok() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _munged_pid() -> Optional[int]:
    """munged's pid: from its pid file, else from the lock it holds on its socket's lock file."""
    pid = _pid_of(MUNGE_PID, "munged")
    if pid:
        return pid
    try:
        inode = (MUNGE_RUN / "munge.socket.2.lock").stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[5].rsplit(":", 1)[-1] == str(inode):
                pid = int(parts[4])
                if _pid_alive(pid) and _runs(pid, "munged"):
                    return pid
    except (OSError, ValueError):
        pass
    return None


def _stop_munge() -> None:
    """Stop munged if (and only if) this harness started it (the journal has its pid)."""
    pid = _journal().get("munged_pid")
    if pid and _pid_alive(int(pid)) and _runs(int(pid), "munged"):
        _terminate([int(pid)], "munged")
        with contextlib.suppress(OSError):
            MUNGE_PID.unlink()


def _start_munge() -> None:
    """Use a munged that answers (the machine's own, left alone); else start one, journaling the
    key, folders and files it creates (stop() removes those, and only those)."""
    if _munge_ok():
        return
    other = _munged_pid()
    if other:
        raise SlurmError(f"munged (pid {other}) runs but does not answer `munge -n | unmunge`: stop or "
                         f"fix it (this harness stops only the munged it started)")
    mu = pwd.getpwnam("munge")
    for d, mode in MUNGE_DIRS:
        _mkdir_noted(d, mode, mu)
    for f in MUNGE_FILES:
        if not f.exists():
            _journal_append("created_files", str(f))
    if not MUNGE_KEY.exists():
        MUNGE_KEY.write_bytes(os.urandom(128))
        os.chown(MUNGE_KEY, mu.pw_uid, mu.pw_gid)
        os.chmod(MUNGE_KEY, 0o400)
    _log("starting munged")
    res = subprocess.run([_bin("munged"), "--force"], user="munge", group="munge", capture_output=True,
                         text=True, timeout=30, start_new_session=True, env=_daemon_env())
    if res.returncode != 0:
        raise SlurmError(f"munged failed to start: {res.stderr.strip()}")
    _wait(_munge_ok, 15, "munge to answer")
    _journal_set(munged_pid=_munged_pid())


# ----------------------------------------------------------------------------- mariadb


def _mysql(sql: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return _run(["mariadb", "--no-defaults", f"--socket={MYSQL_SOCK}", "-uroot", "-e", sql], timeout=timeout)


def _mariadb_ok(port: int) -> bool:
    if not _pid_of(MYSQL_PID, "mariadbd"):
        return False
    res = subprocess.run(["mariadb-admin", "--no-defaults", f"--socket={MYSQL_SOCK}", "-uroot",
                          "--connect-timeout=2", "ping"], capture_output=True, timeout=10)
    return res.returncode == 0 and _port_open(port)


def _start_mariadb(port: int) -> None:
    my = pwd.getpwnam("mysql")
    for d in (MYSQL_RUN,):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, my.pw_uid, my.pw_gid)
    STATE_DIR.chmod(0o755)
    marker = MYSQL_DIR / ".barlow-initialised"
    if not marker.exists():
        _log(f"initialising a MariaDB datadir in {MYSQL_DIR}")
        shutil.rmtree(MYSQL_DIR, ignore_errors=True)
        _run([_bin("mariadb-install-db"), "--no-defaults", f"--datadir={MYSQL_DIR}", "--user=mysql",
              "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=180)
        marker.touch()
    _log("starting mariadbd")
    # its error log goes to stderr (the mysql user may not write LOG_DIR; we open the file as root)
    with open(LOG_DIR / "mariadb.log", "ab") as out:
        subprocess.Popen(
            [_bin("setsid"), "-f", _bin("mariadbd"), "--no-defaults", f"--datadir={MYSQL_DIR}",
             f"--socket={MYSQL_SOCK}", f"--pid-file={MYSQL_PID}", f"--port={port}",
             "--bind-address=127.0.0.1", "--user=mysql",
             "--skip-name-resolve", "--performance-schema=OFF",
             "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=2"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=_daemon_env()).wait(timeout=30)
    _wait(lambda: _mariadb_ok(port), 90, "MariaDB to answer")


def _reset_accounting_db() -> None:
    """Fresh accounting for a fresh slurmctld (job ids restart at 1, so old records would clash)."""
    users = ", ".join(f"'{DB_USER}'@'{h}'" for h in ("localhost", "127.0.0.1"))
    sql = "".join(f"CREATE USER IF NOT EXISTS '{DB_USER}'@'{h}' IDENTIFIED BY '{DB_PASS}';"
                  for h in ("localhost", "127.0.0.1"))
    sql += f"DROP DATABASE IF EXISTS {DB_NAME}; GRANT ALL ON {DB_NAME}.* TO {users}; FLUSH PRIVILEGES;"
    _mysql(sql)


# ----------------------------------------------------------------------------- slurm daemons


def _stop_slurm_daemons(ports: Dict[str, object], cancel_jobs: bool = True) -> None:
    """Stop slurmd/slurmctld/slurmdbd: by their pid files, and by whoever of them holds our ports."""
    if cancel_jobs and _pid_of(RUN_DIR / "slurmctld.pid", "slurmctld"):
        _cancel_all_jobs()
    slurmd_pids = []
    for pf in RUN_DIR.glob("slurmd-*.pid") if RUN_DIR.exists() else []:
        pid = _pid_of(pf, "slurmd")
        if pid:
            slurmd_pids.append(pid)
    for port in dict(ports.get("slurmd", {})).values():
        slurmd_pids += [p for p in _listening_pids(int(port)) if _runs(p, "slurmd") and p not in slurmd_pids]
    _terminate(slurmd_pids, "slurmd")
    for pf in RUN_DIR.glob("slurmd-*.pid") if RUN_DIR.exists() else []:
        with contextlib.suppress(OSError):
            pf.unlink()
    _stop_daemon(RUN_DIR / "slurmctld.pid", "slurmctld", ports=[int(ports["slurmctld"])] if ports else [])
    _stop_daemon(RUN_DIR / "slurmdbd.pid", "slurmdbd", ports=[int(ports["slurmdbd"])] if ports else [])


def _cancel_all_jobs(timeout: float = 20) -> None:
    """scancel every job (so no job step outlives the cluster), and wait until they are gone."""
    try:
        ids = _run(["squeue", "-h", "-o", "%A"], timeout=10).stdout.split()
        if not ids:
            return
        _log(f"cancelling jobs {' '.join(ids)}")
        _run(["scancel", *ids], timeout=10, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = _run(["squeue", "-h", "-o", "%T"], timeout=10).stdout.split()
            if not states:
                return
            time.sleep(0.5)
        _log(f"jobs still not gone after {timeout} s: {states}")
    except SlurmError as exc:
        _log(f"could not cancel jobs: {exc}")


def _start_daemon(cmd: List[str], what: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, start_new_session=True,
                         env=_daemon_env(), stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise SlurmError(f"{what} failed to start (exit {res.returncode}): {res.stderr.strip()}\n"
                         f"{_log_tails()}")


def _node_states() -> Dict[str, str]:
    """{node: long state} from sinfo, e.g. {'n1': 'idle', 'n2': 'down*'}; {} if slurmctld does not answer."""
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return {}
    if res.returncode != 0:
        return {}
    states = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]  # nodes appear once per partition: same state
    return states


def _sacct_ok() -> bool:
    try:
        return subprocess.run(["sacct", "-n", "-X", "-o", "JobID"], capture_output=True,
                              timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _unhealthy(nodes: List[str], accounting: bool = True) -> Optional[str]:
    """Why the running cluster is not the healthy one asked for; None if it is."""
    ports = _ports()
    try:
        if not ports or FINGERPRINT.read_text() != _fingerprint(nodes, ports, accounting):
            return "another configuration or node count"
        if SLURM_CONF.read_text() != _slurm_conf(nodes, ports, accounting) or (
                accounting and SLURMDBD_CONF.read_text() != _slurmdbd_conf(ports)):
            return "configuration files changed"
    except OSError:
        return "not started (no fingerprint)"
    daemons = [("slurmctld", _pid_of(RUN_DIR / "slurmctld.pid", "slurmctld"))]
    if accounting:
        daemons.append(("slurmdbd", _pid_of(RUN_DIR / "slurmdbd.pid", "slurmdbd")))
    for what, pid in daemons + [(f"slurmd -N {n}", _pid_of(_slurmd_pidfile(n), "slurmd")) for n in nodes]:
        if not pid:
            return f"{what} is not running"
    if not _munge_ok():
        return "munge does not answer"
    if accounting and not _mariadb_ok(int(ports["mariadb"])):
        return "MariaDB does not answer"
    states = _node_states()
    if sorted(states) != sorted(nodes) or any(s not in _UP_STATES for s in states.values()):
        return f"node states {states or 'unavailable'}"
    if accounting and not _sacct_ok():
        return "sacct does not answer"
    return None


# ----------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """A handle on the running cluster (start() returns it)."""

    nodes: List[str]
    partition: str = "debug"
    partitions: List[str] = field(default_factory=lambda: ["debug", "short"])
    reused: bool = False  # True when start() found it already up (and did nothing)
    start_seconds: float = 0.0
    state_dir: Path = STATE_DIR
    log_dir: Path = LOG_DIR
    ports: Dict[str, object] = field(default_factory=dict)  # slurmctld, slurmdbd, mariadb, slurmd {node: port}

    def env(self) -> Dict[str, str]:
        """Environment a subprocess needs to reach the cluster: the config lives where the clients
        look by default (/etc/slurm), so this only makes it explicit."""
        return {"SLURM_CONF": str(SLURM_CONF)}

    def node_states(self) -> Dict[str, str]:
        return _node_states()

    def wait_idle(self, timeout: float = 60) -> None:
        _wait(lambda: (s := _node_states()) and sorted(s) == sorted(self.nodes)
              and all(v == "idle" for v in s.values()), timeout, f"nodes {self.nodes} to be idle")

    def job_state(self, job_id: str) -> str:
        """Current state of a job (of its latest run): from slurmctld, else from accounting."""
        res = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=10)
        if res.returncode == 0:
            for tok in res.stdout.split():
                if tok.startswith("JobState="):
                    return tok.split("=", 1)[1]
        states = self.sacct_states(job_id)
        return states[-1] if states else "UNKNOWN"

    def wait_job(self, job_id: str, timeout: float = 60, poll: float = 0.5) -> str:
        """Wait until the job ended; returns its final state (e.g. COMPLETED). TimeoutError if not.

        Also waits (up to 20 s more) until accounting has recorded that end: slurmctld sends job
        records to slurmdbd asynchronously, so sacct (and submitit, which polls sacct) can lag
        scontrol by seconds; after wait_job, sacct_states() agrees with the returned state."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in _TERMINAL:
                break
            time.sleep(poll)
        else:
            raise TimeoutError(f"job {job_id} still {state} after {timeout} s")
        settle = time.monotonic() + 20
        while time.monotonic() < settle:
            recorded = self.sacct_states(job_id)
            if recorded and recorded[-1] == state:
                break
            time.sleep(poll)
        else:
            _log(f"job {job_id}: slurmctld says {state}, accounting still {self.sacct_states(job_id)}")
        return state

    def sacct_states(self, job_id: str) -> List[str]:
        """States of every run of the job (allocation records, requeues included), oldest first,
        e.g. ['REQUEUED', 'COMPLETED'], as accounting has them: it lags slurmctld by up to a few
        seconds (wait_job waits for it). ('CANCELLED by 0' reads 'CANCELLED'.)"""
        res = _run(["sacct", "-n", "-X", "-D", "-P", "-j", str(job_id), "-o", "JobID,State,Start"],
                   timeout=15)
        rows = []
        for line in res.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 3 and parts[0] == str(job_id):
                rows.append(parts[1].split()[0] if parts[1] else "")
        return rows

    def logs(self) -> str:
        return _log_tails()


class _Lap:
    """Records how long each phase of a start took (for the log)."""

    def __init__(self, t0: float) -> None:
        self.last, self.parts = t0, []

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        self.parts.append(f"{what} {now - self.last:.1f}")
        self.last = now

    def summary(self) -> str:
        return ", ".join(self.parts)


def _live_users() -> List[int]:
    users = []
    for f in USERS_DIR.glob("*") if USERS_DIR.exists() else []:
        if f.name.isdigit() and _pid_alive(int(f.name)):
            users.append(int(f.name))
        else:
            with contextlib.suppress(OSError):
                f.unlink()
    return users


def start(nodes: int = 2, timeout: float = 120, hold: bool = False, keep: bool = False,
          prefix: str = "n", accounting: bool = True) -> Cluster:
    """Start the cluster, or return at once if the same cluster is already up and healthy.

    hold: register this process as a user of the cluster (see release()), atomically with the start.
    keep: mark the cluster as wanted beyond its users (release() will then never stop it).
    prefix: node names (n -> n1, n2, ...). accounting: False runs no MariaDB/slurmdbd (no sacct).
    A cold start that fails stops what it started and restores the machine before raising.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes must be 1..{MAX_NODES}")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the one-host SLURM cluster needs root (daemons, /etc/slurm, /etc/hosts)")
    t0 = time.monotonic()
    require_installed()
    names = _node_names(nodes, prefix)
    with _locked():
        why = _unhealthy(names, accounting)
        others = [p for p in _live_users() if p != os.getpid()]
        if why and others and not why.startswith(("another", "configuration", "not started")):
            # another live process uses this cluster: a slow answer under load must not make us
            # tear it down under its jobs, so look again for a while first
            _log(f"cluster looks unhealthy ({why}) while pid {others} use it: checking again")
            deadline = time.monotonic() + 30
            while why and time.monotonic() < deadline:
                time.sleep(2)
                why = _unhealthy(names, accounting)
        if not why:
            _mark(hold, keep)
            took = time.monotonic() - t0
            _log(f"cluster already up ({', '.join(names)}): reused in {took:.2f} s")
            return Cluster(nodes=names, reused=True, start_seconds=took, ports=_ports())
        _log(f"cold start of a {nodes}-node cluster ({why})")
        # an earlier run (this harness's, perhaps killed) is stopped and undone first
        _stop_locked(keep_lock=True, quiet=True)
        try:
            return _cold_start(names, accounting, timeout, hold, keep, t0)
        except BaseException:
            _log(f"cold start failed: stopping what it started and restoring the machine\n{_log_tails()}")
            try:
                _stop_locked(keep_lock=False)
            except SlurmError as exc:
                _log(str(exc))
            raise


def _cold_start(names: List[str], accounting: bool, timeout: float, hold: bool, keep: bool,
                t0: float) -> Cluster:
    lap = _Lap(t0)
    for d in (STATE_DIR, RUN_DIR, LOG_DIR):
        d.mkdir(parents=True, exist_ok=True)
    STATE_DIR.chmod(0o755)
    ports = _pick_ports(names)
    _write(PORTS_FILE, json.dumps(ports))
    _journal_set(started=time.time())
    _ensure_hosts(names)
    _start_munge()
    lap("munge")
    if accounting:
        _start_mariadb(int(ports["mariadb"]))
        _reset_accounting_db()
        lap("mariadb")
    CTLD_STATE.mkdir(parents=True)
    for n in names:
        (SPOOL_DIR / n).mkdir(parents=True)
    _write_etc(SLURM_CONF, _slurm_conf(names, ports, accounting))
    if accounting:
        _write_etc(SLURMDBD_CONF, _slurmdbd_conf(ports), mode=0o600)
        _log("starting slurmdbd")
        _start_daemon([_bin("slurmdbd")], "slurmdbd")
        # slurmctld started with no state before slurmdbd listens aborts ("no TRES")
        _wait(lambda: _port_open(int(ports["slurmdbd"])), timeout, f"slurmdbd to listen on {ports['slurmdbd']}")
        lap("slurmdbd")
    _log("starting slurmctld")
    _start_daemon([_bin("slurmctld"), "-i"], "slurmctld")
    _wait(lambda: _port_open(int(ports["slurmctld"]))
          and _run(["scontrol", "ping"], check=False, timeout=10).returncode == 0,
          timeout, "slurmctld to answer")
    lap("slurmctld")
    for n in names:
        _start_daemon([_bin("slurmd"), "-N", n], f"slurmd -N {n}")
    cluster = Cluster(nodes=names, ports=ports)
    cluster.wait_idle(timeout)
    lap("nodes idle")
    if accounting:
        _wait(_sacct_ok, timeout, "sacct to answer")
    _write(FINGERPRINT, _fingerprint(names, ports, accounting))
    _mark(hold, keep)
    cluster.start_seconds = time.monotonic() - t0
    _log(f"cluster up ({', '.join(names)}, ports {ports}) in {cluster.start_seconds:.1f} s ({lap.summary()})")
    return cluster


def _mark(hold: bool, keep: bool) -> None:
    if hold:
        USERS_DIR.mkdir(parents=True, exist_ok=True)
        (USERS_DIR / str(os.getpid())).touch()
    if keep:
        KEEP_MARKER.touch()


def release(stop_if_unused: bool = True) -> bool:
    """Drop this process's hold (start(hold=True)); stop the cluster if stop_if_unused and no other
    live process holds it and nobody asked to keep it (start(keep=True)). Returns True if stopped."""
    if os.geteuid() != 0 or not STATE_DIR.exists():
        return False
    with _locked():
        with contextlib.suppress(OSError):
            (USERS_DIR / str(os.getpid())).unlink()
        others = _live_users()
        if not stop_if_unused or others or KEEP_MARKER.exists():
            why = (f"still held by pid {', '.join(map(str, others))}" if others
                   else "asked to keep it running" if KEEP_MARKER.exists() else "not asked to stop it")
            _log(f"cluster left running ({why})")
            return False
        _stop_locked()
    return True


def stop() -> None:
    """Cancel all jobs, stop every daemon the harness started (munged and mariadbd included), put
    /etc/hosts and /etc/slurm back as they were, and remove what it created (the state dir too)."""
    if os.geteuid() != 0:
        return
    with _locked():
        _stop_locked()


# what the state dir may hold; stop() removes these and then the dir if it is empty (never more:
# BARLOW_SLURM_STATE may name a folder that holds other things)
_STATE_ENTRIES = (RUN_DIR, LOG_DIR, CTLD_STATE, SPOOL_DIR, MYSQL_DIR, MYSQL_RUN, FINGERPRINT, PORTS_FILE,
                  JOURNAL, BACKUP_DIR, USERS_DIR, KEEP_MARKER, _p("fingerprint.json.tmp"), _p("ports.json.tmp"),
                  _p("restore.json.tmp"))


def _daemons() -> Dict[str, Optional[int]]:
    """Our daemons' pids (None: not running); munged only if this harness started it."""
    j = _journal()
    munged = j.get("munged_pid")
    found = {
        "munged": int(munged) if munged and _pid_alive(int(munged)) and _runs(int(munged), "munged") else None,
        "mariadbd": _pid_of(MYSQL_PID, "mariadbd"),
        "slurmdbd": _pid_of(RUN_DIR / "slurmdbd.pid", "slurmdbd"),
        "slurmctld": _pid_of(RUN_DIR / "slurmctld.pid", "slurmctld"),
    }
    for pf in sorted(RUN_DIR.glob("slurmd-*.pid")) if RUN_DIR.exists() else []:
        found[pf.stem] = _pid_of(pf, "slurmd")
    return found


def _stop_locked(keep_lock: bool = False, quiet: bool = False) -> None:
    """Stop, undo the journal, remove the state dir's contents (the lock file too unless keep_lock).
    Every step runs even if an earlier one failed; a failure to restore raises SlurmError at the end."""
    ports = _ports()
    had_anything = bool(ports) or JOURNAL.exists() or any(_daemons().values())
    errors = []
    for f in (FINGERPRINT, KEEP_MARKER):
        with contextlib.suppress(OSError):
            f.unlink()
    for what, step in (
            ("slurm daemons", lambda: _stop_slurm_daemons(ports)),
            ("mariadbd", lambda: _stop_daemon(MYSQL_PID, "mariadbd",
                                              ports=[int(ports["mariadb"])] if ports else [], timeout=30)),
            ("munged", _stop_munge)):
        try:
            step()
        except Exception as exc:  # noqa: BLE001  (stop the rest regardless)
            errors.append(f"stopping {what}: {exc}")
    left = {k: v for k, v in _daemons().items() if v}
    if left:
        errors.append(f"still running: {left}")
    errors += _undo_journal()
    for entry in _STATE_ENTRIES + (() if keep_lock else (LOCK_FILE,)):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    if not keep_lock:
        with contextlib.suppress(OSError):
            STATE_DIR.rmdir()  # only if empty
    if errors:
        raise SlurmError("stopping the SLURM test cluster left things behind:\n" + "\n".join(errors))
    if had_anything or not quiet:
        _log("cluster stopped; /etc/hosts and /etc/slurm restored")


def save_logs(dest: Path) -> Optional[Path]:
    """Copy the daemons' logs to dest (stop() removes the state dir with them); None if none."""
    if not LOG_DIR.is_dir() or not any(LOG_DIR.iterdir()):
        return None
    dest.mkdir(parents=True, exist_ok=True)
    for log in LOG_DIR.iterdir():
        with contextlib.suppress(OSError):
            shutil.copy2(log, dest / log.name)
    return dest


def status() -> Dict[str, object]:
    return {"state_dir": str(STATE_DIR), "daemons": _daemons(), "ports": _ports(),
            "nodes": _node_states() if SLURM_CONF.exists() else {},
            "held_by_pids": _live_users(), "keep_running": KEEP_MARKER.exists(),
            "missing_programs": _missing_binaries()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster.slurm", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start (or reuse) the cluster; kept running until `stop`")
    st.add_argument("--nodes", type=int, default=2)
    sub.add_parser("stop", help="cancel all jobs, stop every daemon, restore /etc (even while a test session uses it)")
    sub.add_parser("status", help="daemons and node states")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "start":
            c = start(nodes=args.nodes, keep=True)
            print(f"{'reused' if c.reused else 'started'} in {c.start_seconds:.1f} s: "
                  f"nodes {' '.join(c.nodes)}, partitions {' '.join(c.partitions)} "
                  f"(default {c.partition}); logs in {c.log_dir}")
            print(_run(["sinfo"], check=False).stdout, end="")
        elif args.cmd == "stop":
            stop()
        else:
            s = status()
            print(json.dumps(s, indent=2))
            return 0 if s["nodes"] and all(p for k, p in s["daemons"].items() if k != "munged") else 1
    except (SlurmError, SlurmUnavailable, SlurmNotInstalled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
