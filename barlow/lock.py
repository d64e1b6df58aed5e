"""One trainer per output folder: ``with exclusive(out_dir): ...``.

The lock is an ``flock`` on ``out_dir/.train.lock``; a second trainer for the same folder prints
that it waits and blocks until the first one is done (the kernel drops the lock when its holder
dies, however it dies).

Some cluster file systems do not implement flock (Lustre mounted without ``-o flock`` or
``localflock``, some NFS set-ups): ``flock`` raises ENOSYS, EOPNOTSUPP or ENOLCK. Then the lock
is a file created with O_CREAT|O_EXCL, ``out_dir/.train.lock.owner``, holding the holder's
hostname and pid; the holder touches it every ``HEARTBEAT_S`` seconds and removes it when done.
A waiter takes over a lock file whose holder is gone: a dead pid on the same host, or no
heartbeat for ``STALE_S`` seconds (a holder on another host that died or was killed). A note is
printed when the fallback is used.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from barlow.errors import BadInput

# flock is not available on this file system (not: someone else holds the lock).
UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL}
HEARTBEAT_S = 60.0  # the fallback lock's holder touches its file this often
STALE_S = 30 * 60.0  # ... and a lock file untouched this long belongs to a holder that is gone
POLL_S = 5.0  # a waiter on the fallback lock looks again this often


class LockTimeout(BadInput):
    """Another holder kept the lock longer than the caller may wait."""


def _timeout(path: Path, max_wait_s: float, holder: str) -> LockTimeout:
    return LockTimeout(f"{path}: still held after {max_wait_s / 60:.0f} min ({holder}); another trainer is "
                       f"writing into {path.parent}: wait for it, or stop it, then rerun (the run resumes)")


def _flock(f, path: Path, log, poll_s: float, max_wait_s: float | None) -> None:
    """flock, polled (a blocking flock on some NFS set-ups never returns), for at most ``max_wait_s``."""
    t0 = time.monotonic()
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        log(f"another process is training into {path.parent}; waiting for it to finish")
    while True:
        if max_wait_s is not None and time.monotonic() - t0 > max_wait_s:
            raise _timeout(path, max_wait_s, "flock")
        time.sleep(min(poll_s, 1.0))
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            continue


@contextlib.contextmanager
def exclusive(out_dir: Path, *, log=print, poll_s: float = POLL_S, stale_s: float = STALE_S,
              heartbeat_s: float = HEARTBEAT_S, max_wait_s: float | None = None):
    """Hold the lock of ``out_dir`` for the ``with`` block; wait (with a message) while another holds it,
    at most ``max_wait_s`` (then LockTimeout: one line naming the lock; None: for ever)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".train.lock", "a+") as f:
        try:
            _flock(f, out_dir / ".train.lock", log, poll_s, max_wait_s)
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            reason = errno.errorcode.get(e.errno, str(e.errno))
        else:
            yield
            return
    log(f"note: {out_dir} is on a file system without flock ({reason}); locking with "
        f"{out_dir / '.train.lock.owner'} (hostname + pid) instead")
    with _owner_file(out_dir / ".train.lock.owner", log, poll_s, stale_s, heartbeat_s, max_wait_s):
        yield


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(path: Path, stale_s: float = STALE_S, now: float | None = None) -> str:
    """Why the lock file at ``path`` belongs to a holder that is gone ('' if it may be alive)."""
    try:
        text = path.read_text()
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return "gone"
    try:
        owner = json.loads(text)
        host, pid = str(owner["host"]), int(owner["pid"])
    except (ValueError, KeyError, TypeError):
        # Unreadable: a holder killed between creating and writing it, or one writing right now.
        return f"unreadable and {age:.0f} s old" if age > min(stale_s, 60.0) else ""
    if host == socket.gethostname() and not _pid_alive(pid):
        return f"pid {pid} on {host} is dead"
    if age > stale_s:
        return f"held by pid {pid} on {host}, no heartbeat for {age:.0f} s"
    return ""


@contextlib.contextmanager
def _owner_file(path: Path, log, poll_s: float, stale_s: float, heartbeat_s: float, max_wait_s: float | None = None):
    me = json.dumps(_me())
    waiting = False
    t0 = time.monotonic()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            why = stale_reason(path, stale_s)
            if why:
                log(f"taking over the stale lock {path} ({why})")
                # Move it aside under a unique name: of two waiters that judged it stale, one wins.
                aside = path.with_name(f"{path.name}.stale.{os.getpid()}.{threading.get_ident()}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, aside)
                    os.unlink(aside)
                continue
            if not waiting:
                log(f"another process is training into {path.parent} ({path.read_text().strip() if path.exists() else '?'}); "
                    "waiting for it to finish")
                waiting = True
            if max_wait_s is not None and time.monotonic() - t0 > max_wait_s:
                with contextlib.suppress(OSError):
                    raise _timeout(path, max_wait_s, path.read_text().strip())
                raise _timeout(path, max_wait_s, "?")
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    stop = threading.Event()

    def beat():
        while not stop.wait(heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(path)

    beater = threading.Thread(target=beat, name="lock-heartbeat", daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()
        with contextlib.suppress(OSError):
            if path.read_text() == me:  # still ours (not taken over after a long suspend)
                path.unlink()
