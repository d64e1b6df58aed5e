"""A real SLURM cluster on this one host, for tests (Debian 12, slurm-wlm 22.05, run as root).

What it runs (no systemd needed):
  munged (as user munge, key /etc/munge/munge.key mode 400, socket under /run/munge)
  mariadbd (via setsid, bound to 127.0.0.1:3316, its own datadir under the state dir)
  slurmdbd (port 6819, so ``sacct`` works), slurmctld (port 6817),
  one ``slurmd -N nX`` per node (port 1700X; Debian builds slurmd with multiple-slurmd support).

Nodes ``n1..nN`` (CPUs=2, RealMemory=4000 each) all resolve to 127.0.0.1 (a line in /etc/hosts);
partitions ``debug`` (default, no time limit) and ``short`` (MaxTime=00:05:00), both with all nodes.
The configuration is written to /etc/slurm (slurm.conf, slurmdbd.conf), where Debian's clients look
by default, so sbatch/srun/sinfo/sacct (and submitit, Snakemake's SLURM plugin) work with no
environment; :meth:`Cluster.env` still returns ``SLURM_CONF`` for explicitness.
State, pid files and logs live in ``$BARLOW_SLURM_STATE`` (default /var/lib/barlow-slurm); daemon
logs are in its ``log/`` folder.

API::

    ensure_installed()          # apt-get install what is missing (root only)
    cluster = start(nodes=2)    # idempotent: returns at once if the same cluster is up and healthy
    start(nodes=2, hold=True)   # ... and registers this process as a user; release() drops that and
    release()                   #     stops the cluster when no live user is left (unless keep=True)
    cluster.wait_job(job_id, timeout=60) -> final state
    cluster.sacct_states(job_id) -> ["REQUEUED", "COMPLETED"] (every run of the job, oldest first)
    stop()

A *cold* start (nothing healthy running, or another node count) kills stale daemons from an earlier
run, wipes the slurmctld state AND the accounting database, so job ids restart at 1: tests must
use a fresh submitit folder (e.g. under pytest's tmp_path) and never reuse one across runs, or
submitit may read files of an older job with the same id.

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
CLUSTER_NAME = "barlow"
CTLD_PORT = 6817
DBD_PORT = 6819
MYSQL_PORT = 3316  # not 3306: leaves the distribution's own MariaDB alone
SLURMD_PORT_BASE = 17000  # node nX listens on 17000 + X
MAX_NODES = 16
CPUS_PER_NODE = 2
REAL_MEMORY_MB = 4000
DEF_MEM_PER_CPU_MB = 1000
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
DB_PASS = "barlow-test-only"  # a throwaway database bound to 127.0.0.1

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server"]
BINARIES = ["munged", "munge", "unmunge", "mariadbd", "mariadb-install-db", "mariadb", "mariadb-admin",
            "slurmdbd", "slurmctld", "slurmd", "sinfo", "squeue", "scontrol", "sbatch", "srun", "sacct",
            "sacctmgr", "scancel"]

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
MUNGE_PID = MUNGE_RUN / "munged.pid"

# node states that count as "up" (the cluster is healthy) and as "free" (idle)
_UP_STATES = {"idle", "mixed", "allocated", "completing"}
_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
             "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be had on this machine at all (not root, or no package registry)."""


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
LOCK_FILE = _p("lock")
USERS_DIR = _p("users")  # one file per process that holds the cluster (start(hold=True))
KEEP_MARKER = _p("keep-running")  # written by start(keep=True), e.g. the CLI: release() won't stop it


def _node_names(nodes: int) -> List[str]:
    return [f"n{i}" for i in range(1, nodes + 1)]


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
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- installing


_SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"


def _bin(name: str) -> str:
    """Full path of a program (daemons live in /usr/sbin, which a PATH may lack)."""
    return shutil.which(name, path=_SEARCH_PATH) or name


def _missing_binaries() -> List[str]:
    return [b for b in BINARIES if shutil.which(b, path=_SEARCH_PATH) is None]


def _apt(cmd: List[str], env: Dict[str, str], lock_wait: float = 300) -> subprocess.CompletedProcess:
    """Run an apt-get command, retrying while another process holds an apt/dpkg lock."""
    deadline = time.monotonic() + lock_wait
    while True:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if res.returncode == 0 or "Could not get lock" not in res.stderr or time.monotonic() > deadline:
            return res
        _log("apt is locked by another process: waiting")
        time.sleep(5)


def ensure_installed() -> float:
    """Install the Debian packages if any program is missing; returns the seconds spent.

    Raises SlurmUnavailable if not root or if the package registry cannot be reached.
    """
    if not _missing_binaries():
        return 0.0
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed and installing it needs root "
                               f"(missing: {', '.join(_missing_binaries())})")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-q"]
    _log(f"installing {' '.join(PACKAGES)} (apt-get)")
    upd = _apt(apt + ["update"], env)
    inst = _apt(apt + ["install", "-y", *PACKAGES], env)
    if inst.returncode != 0 or _missing_binaries():
        text = upd.stdout + upd.stderr + inst.stdout + inst.stderr
        unreachable = any(s in text for s in ("Could not resolve", "Failed to fetch", "Temporary failure",
                                              "Unable to locate package", "Network is unreachable",
                                              "Could not connect"))
        msg = f"apt-get install {' '.join(PACKAGES)} failed (exit {inst.returncode}):\n{text[-3000:]}"
        raise (SlurmUnavailable if unreachable else SlurmError)(msg)
    took = time.monotonic() - t0
    _log(f"installed in {took:.1f} s")
    return took


# ----------------------------------------------------------------------------- configuration


def _slurm_conf(nodes: List[str]) -> str:
    host = socket.gethostname().split(".")[0]
    node_lines = "\n".join(
        f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={SLURMD_PORT_BASE + i} "
        f"CPUs={CPUS_PER_NODE} RealMemory={REAL_MEMORY_MB} State=UNKNOWN"
        for i, n in enumerate(nodes, start=1))
    all_nodes = ",".join(nodes)
    return f"""\
# Written by tests/cluster/slurm.py (a one-host test cluster); rewritten on every cold start.
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={CTLD_PORT}
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
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={DBD_PORT}
{node_lines}
PartitionName=debug Nodes={all_nodes} Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes={all_nodes} MaxTime=00:05:00 State=UP
"""


def _slurmdbd_conf() -> str:
    return f"""\
# Written by tests/cluster/slurm.py (a one-host test cluster).
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={DBD_PORT}
SlurmUser=root
DebugLevel=info
LogFile={LOG_DIR}/slurmdbd.log
PidFile={RUN_DIR}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={MYSQL_PORT}
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
"""


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _fingerprint(nodes: List[str]) -> str:
    h = hashlib.sha256((_slurm_conf(nodes) + _slurmdbd_conf()).encode()).hexdigest()
    return json.dumps({"nodes": nodes, "conf_sha256": h})


def _ensure_hosts(nodes: List[str]) -> None:
    """Make the node names resolve to 127.0.0.1 (torch's master address is the first node name)."""
    hosts = Path("/etc/hosts")
    text = hosts.read_text() if hosts.exists() else ""
    known = set()
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if parts and parts[0] == "127.0.0.1":
            known.update(parts[1:])
    missing = [n for n in nodes if n not in known]
    if missing:
        with open(hosts, "a") as fh:  # append in place: /etc/hosts may be a bind mount
            sep = "" if text.endswith("\n") or not text else "\n"
            fh.write(f"{sep}127.0.0.1 {' '.join(missing)}\n")
        _log(f"/etc/hosts: added 127.0.0.1 {' '.join(missing)}")


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
    pid = _munged_pid()
    if pid:
        _terminate([pid], "munged")
    with contextlib.suppress(OSError):
        MUNGE_PID.unlink()


def _start_munge() -> None:
    if _munge_ok():
        return
    _stop_munge()
    mu = pwd.getpwnam("munge")
    MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
    os.chown(MUNGE_KEY.parent, mu.pw_uid, mu.pw_gid)
    if not MUNGE_KEY.exists() or MUNGE_KEY.stat().st_size < 32:
        MUNGE_KEY.write_bytes(os.urandom(128))
    os.chown(MUNGE_KEY, mu.pw_uid, mu.pw_gid)
    os.chmod(MUNGE_KEY, 0o400)
    for d, mode in ((MUNGE_RUN, 0o755), (Path("/var/lib/munge"), 0o711), (Path("/var/log/munge"), 0o700)):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, mu.pw_uid, mu.pw_gid)
        os.chmod(d, mode)
    _log("starting munged")
    res = subprocess.run([_bin("munged"), "--force"], user="munge", group="munge", capture_output=True,
                         text=True, timeout=30, start_new_session=True, env=_daemon_env())
    if res.returncode != 0:
        raise SlurmError(f"munged failed to start: {res.stderr.strip()}")
    _wait(_munge_ok, 15, "munge to answer")


# ----------------------------------------------------------------------------- mariadb


def _mysql(sql: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return _run(["mariadb", "--no-defaults", f"--socket={MYSQL_SOCK}", "-uroot", "-e", sql], timeout=timeout)


def _mariadb_ok() -> bool:
    if not _pid_of(MYSQL_PID, "mariadbd"):
        return False
    res = subprocess.run(["mariadb-admin", "--no-defaults", f"--socket={MYSQL_SOCK}", "-uroot",
                          "--connect-timeout=2", "ping"], capture_output=True, timeout=10)
    return res.returncode == 0 and _port_open(MYSQL_PORT)


def _start_mariadb() -> None:
    if _mariadb_ok():
        return
    _stop_daemon(MYSQL_PID, "mariadbd", ports=[MYSQL_PORT], timeout=30)
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
             f"--socket={MYSQL_SOCK}", f"--pid-file={MYSQL_PID}", f"--port={MYSQL_PORT}",
             "--bind-address=127.0.0.1", "--user=mysql",
             "--skip-name-resolve", "--performance-schema=OFF",
             "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=2"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=_daemon_env()).wait(timeout=30)
    _wait(_mariadb_ok, 90, "MariaDB to answer")


def _reset_accounting_db() -> None:
    """Fresh accounting for a fresh slurmctld (job ids restart at 1, so old records would clash)."""
    users = ", ".join(f"'{DB_USER}'@'{h}'" for h in ("localhost", "127.0.0.1"))
    sql = "".join(f"CREATE USER IF NOT EXISTS '{DB_USER}'@'{h}' IDENTIFIED BY '{DB_PASS}';"
                  for h in ("localhost", "127.0.0.1"))
    sql += f"DROP DATABASE IF EXISTS {DB_NAME}; GRANT ALL ON {DB_NAME}.* TO {users}; FLUSH PRIVILEGES;"
    _mysql(sql)


# ----------------------------------------------------------------------------- slurm daemons


def _stop_slurm_daemons(cancel_jobs: bool = True) -> None:
    if cancel_jobs and _pid_of(RUN_DIR / "slurmctld.pid", "slurmctld"):
        _cancel_all_jobs()
    slurmd_pids = []
    for i in range(1, MAX_NODES + 1):
        node = f"n{i}"
        pid = _pid_of(_slurmd_pidfile(node), "slurmd")
        if pid:
            slurmd_pids.append(pid)
        slurmd_pids += [p for p in _listening_pids(SLURMD_PORT_BASE + i)
                        if _runs(p, "slurmd") and p not in slurmd_pids]
    _terminate(slurmd_pids, "slurmd")
    for pf in RUN_DIR.glob("slurmd-*.pid"):
        with contextlib.suppress(OSError):
            pf.unlink()
    _stop_daemon(RUN_DIR / "slurmctld.pid", "slurmctld", ports=[CTLD_PORT])
    _stop_daemon(RUN_DIR / "slurmdbd.pid", "slurmdbd", ports=[DBD_PORT])


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


def _unhealthy(nodes: List[str]) -> Optional[str]:
    """Why the running cluster is not the healthy one asked for; None if it is."""
    try:
        if FINGERPRINT.read_text() != _fingerprint(nodes):
            return "another configuration or node count"
        if SLURM_CONF.read_text() != _slurm_conf(nodes) or SLURMDBD_CONF.read_text() != _slurmdbd_conf():
            return "configuration files changed"
    except OSError:
        return "not started (no fingerprint)"
    for what, pid in [("slurmctld", _pid_of(RUN_DIR / "slurmctld.pid", "slurmctld")),
                      ("slurmdbd", _pid_of(RUN_DIR / "slurmdbd.pid", "slurmdbd"))] + [
                      (f"slurmd -N {n}", _pid_of(_slurmd_pidfile(n), "slurmd")) for n in nodes]:
        if not pid:
            return f"{what} is not running"
    if not _munge_ok():
        return "munge does not answer"
    if not _mariadb_ok():
        return "MariaDB does not answer"
    states = _node_states()
    if sorted(states) != sorted(nodes) or any(s not in _UP_STATES for s in states.values()):
        return f"node states {states or 'unavailable'}"
    if not _sacct_ok():
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


def start(nodes: int = 2, timeout: float = 120, hold: bool = False, keep: bool = False) -> Cluster:
    """Start the cluster, or return at once if the same cluster is already up and healthy.

    hold: register this process as a user of the cluster (see release()), atomically with the start.
    keep: mark the cluster as wanted beyond its users (release() will then never stop it).
    """
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes must be 1..{MAX_NODES}")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the one-host SLURM cluster needs root (daemons, /etc/slurm, /etc/hosts)")
    t0 = time.monotonic()
    ensure_installed()
    names = _node_names(nodes)
    with _locked():
        why = _unhealthy(names)
        others = [p for p in _live_users() if p != os.getpid()]
        if why and others and not why.startswith(("another", "configuration", "not started")):
            # another live process uses this cluster: a slow answer under load must not make us
            # tear it down under its jobs, so look again for a while first
            _log(f"cluster looks unhealthy ({why}) while pid {others} use it: checking again")
            deadline = time.monotonic() + 30
            while why and time.monotonic() < deadline:
                time.sleep(2)
                why = _unhealthy(names)
        if not why:
            _mark(hold, keep)
            took = time.monotonic() - t0
            _log(f"cluster already up ({', '.join(names)}): reused in {took:.2f} s")
            return Cluster(nodes=names, reused=True, start_seconds=took)
        _log(f"cold start of a {nodes}-node cluster ({why})")
        lap = _Lap(t0)
        for d in (STATE_DIR, RUN_DIR, LOG_DIR):
            d.mkdir(parents=True, exist_ok=True)
        STATE_DIR.chmod(0o755)
        with contextlib.suppress(OSError):
            FINGERPRINT.unlink()
        _stop_slurm_daemons()
        _ensure_hosts(names)
        _start_munge()
        lap("munge")
        _start_mariadb()
        _reset_accounting_db()
        lap("mariadb")
        # fresh slurmctld state: job ids restart at 1 (use a fresh submitit folder per test)
        shutil.rmtree(CTLD_STATE, ignore_errors=True)
        shutil.rmtree(SPOOL_DIR, ignore_errors=True)
        CTLD_STATE.mkdir(parents=True)
        for n in names:
            (SPOOL_DIR / n).mkdir(parents=True)
        for log in LOG_DIR.glob("slurm*.log"):  # keep the previous run's logs as *.log.1
            os.replace(log, log.with_name(log.name + ".1"))
        _set_aside_foreign_conf()
        _write(SLURM_CONF, _slurm_conf(names))
        _write(SLURMDBD_CONF, _slurmdbd_conf(), mode=0o600)
        _log("starting slurmdbd")
        _start_daemon([_bin("slurmdbd")], "slurmdbd")
        # slurmctld started with no state before slurmdbd listens aborts ("no TRES")
        _wait(lambda: _port_open(DBD_PORT), timeout, f"slurmdbd to listen on {DBD_PORT}")
        lap("slurmdbd")
        _log("starting slurmctld")
        _start_daemon([_bin("slurmctld"), "-i"], "slurmctld")
        _wait(lambda: _port_open(CTLD_PORT)
              and _run(["scontrol", "ping"], check=False, timeout=10).returncode == 0,
              timeout, "slurmctld to answer")
        lap("slurmctld")
        for n in names:
            _start_daemon([_bin("slurmd"), "-N", n], f"slurmd -N {n}")
        cluster = Cluster(nodes=names)
        cluster.wait_idle(timeout)
        lap("nodes idle")
        _wait(_sacct_ok, timeout, "sacct to answer")
        _write(FINGERPRINT, _fingerprint(names))
        with contextlib.suppress(OSError):
            KEEP_MARKER.unlink()
        _mark(hold, keep)
        cluster.start_seconds = time.monotonic() - t0
        _log(f"cluster up ({', '.join(names)}) in {cluster.start_seconds:.1f} s ({lap.summary()})")
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
    if os.geteuid() != 0:
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
    """Cancel all jobs and stop every daemon of the cluster (munged and mariadbd included)."""
    if os.geteuid() != 0:
        return
    with _locked():
        _stop_locked()


def _stop_locked() -> None:
    for f in (FINGERPRINT, KEEP_MARKER):
        with contextlib.suppress(OSError):
            f.unlink()
    _stop_slurm_daemons()
    _stop_daemon(MYSQL_PID, "mariadbd", ports=[MYSQL_PORT], timeout=30)
    _stop_munge()
    _remove_our_conf()
    _log("cluster stopped")


OURS = "# Written by tests/cluster/slurm.py"


def _set_aside_foreign_conf() -> None:
    """A slurm.conf we did not write (a real cluster's) is moved aside, and put back by stop()."""
    for conf in (SLURM_CONF, SLURMDBD_CONF):
        aside = conf.with_name(conf.name + ".before-barlow-tests")
        if conf.is_file() and not conf.read_text().startswith(OURS) and not aside.exists():
            os.replace(conf, aside)


def _remove_our_conf() -> None:
    """Leave no slurm.conf naming our stopped controller: every SLURM client would wait ~9 s for
    it (snakemake's slurm plugin runs `scontrol show config` on import, so every snakemake call)."""
    for conf in (SLURM_CONF, SLURMDBD_CONF):
        aside = conf.with_name(conf.name + ".before-barlow-tests")
        with contextlib.suppress(OSError):
            if conf.read_text().startswith(OURS):
                conf.unlink()
        if aside.exists() and not conf.exists():
            os.replace(aside, conf)


def status() -> Dict[str, object]:
    daemons = {
        "munged": _munged_pid(),
        "mariadbd": _pid_of(MYSQL_PID, "mariadbd"),
        "slurmdbd": _pid_of(RUN_DIR / "slurmdbd.pid", "slurmdbd"),
        "slurmctld": _pid_of(RUN_DIR / "slurmctld.pid", "slurmctld"),
    }
    for pf in sorted(RUN_DIR.glob("slurmd-*.pid")) if RUN_DIR.exists() else []:
        daemons[pf.stem] = _pid_of(pf, "slurmd")
    return {"state_dir": str(STATE_DIR), "daemons": daemons, "nodes": _node_states(),
            "held_by_pids": _live_users(), "keep_running": KEEP_MARKER.exists(),
            "missing_programs": _missing_binaries()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster.slurm", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="install if needed, then start (or reuse) the cluster")
    st.add_argument("--nodes", type=int, default=2)
    sub.add_parser("stop", help="cancel all jobs and stop every daemon (even while a test session uses it)")
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
            return 0 if s["nodes"] and all(p for p in s["daemons"].values()) else 1
    except (SlurmError, SlurmUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
