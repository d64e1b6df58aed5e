"""barlow.lock.exclusive: flock, a second holder waits, the O_EXCL fallback where flock is unsupported."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from barlow import lock


def _second_holder(out_dir, **kw):
    """Start a thread that takes the lock; returns (waiting, acquired, release) events and the thread."""
    waiting, acquired, release = threading.Event(), threading.Event(), threading.Event()

    def log(msg):
        if "waiting" in msg:
            waiting.set()

    def body():
        with lock.exclusive(out_dir, log=log, **kw):
            acquired.set()
            release.wait(30)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return waiting, acquired, release, t


def test_flock_second_holder_waits_until_the_first_is_done(tmp_path):
    out = tmp_path / "run"
    with lock.exclusive(out):
        assert (out / ".train.lock").is_file()
        waiting, acquired, release, t = _second_holder(out)
        assert waiting.wait(30), "the second holder never said it waits"
        assert not acquired.is_set()  # it said so, and it has not got the lock
    assert acquired.wait(30)
    release.set()
    t.join(30)


def test_flock_held_by_another_process(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True);"
        " sys.stdin.readline()"), str(out / ".train.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waiting, acquired, release, t = _second_holder(out)
        assert waiting.wait(30) and not acquired.is_set()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert acquired.wait(30)
        release.set()
        t.join(30)
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def no_flock(monkeypatch):
    def enosys(f, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", enosys)


def test_enosys_falls_back_to_an_owner_file(tmp_path, no_flock):
    out = tmp_path / "run"
    said = []
    with lock.exclusive(out, log=said.append):
        owner = json.loads((out / ".train.lock.owner").read_text())
        assert owner == {"host": socket.gethostname(), "pid": os.getpid()}
    assert any("without flock (ENOSYS)" in m for m in said), said
    assert not (out / ".train.lock.owner").exists()  # released


def test_enosys_second_holder_waits(tmp_path, no_flock):
    out = tmp_path / "run"
    with lock.exclusive(out, log=lambda m: None):
        waiting, acquired, release, t = _second_holder(out, poll_s=0.05)
        assert waiting.wait(30) and not acquired.is_set()
    assert acquired.wait(30)
    release.set()
    t.join(30)


def test_other_oserrors_are_not_swallowed(tmp_path, monkeypatch):
    def eio(f, op):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fcntl, "flock", eio)
    with pytest.raises(OSError, match="I/O error"):
        with lock.exclusive(tmp_path / "run"):
            pass


def test_stale_owner_file_is_taken_over(tmp_path, no_flock):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid is dead (pid reuse within the test is vanishingly unlikely)
    (out / ".train.lock.owner").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid}))
    said = []
    with lock.exclusive(out, log=said.append, poll_s=0.05):
        assert json.loads((out / ".train.lock.owner").read_text())["pid"] == os.getpid()
    assert any(f"pid {dead_pid}" in m and "dead" in m for m in said), said


def test_stale_by_age_on_another_host(tmp_path, no_flock):
    out = tmp_path / "run"
    out.mkdir()
    path = out / ".train.lock.owner"
    path.write_text(json.dumps({"host": "some-other-node", "pid": 1}))
    assert lock.stale_reason(path, stale_s=1800) == ""  # another host's live-looking lock: wait
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert "no heartbeat" in lock.stale_reason(path, stale_s=1800)
    with lock.exclusive(out, log=lambda m: None, poll_s=0.05):
        assert json.loads(path.read_text())["host"] == socket.gethostname()


def test_heartbeat_keeps_a_long_holder_fresh(tmp_path, no_flock):
    out = tmp_path / "run"
    path = out / ".train.lock.owner"
    with lock.exclusive(out, log=lambda m: None, heartbeat_s=0.02):
        old = time.time() - 3600
        os.utime(path, (old, old))
        deadline = time.monotonic() + 30
        while time.time() - path.stat().st_mtime > 60 and time.monotonic() < deadline:
            time.sleep(0.02)  # progress: wait for the heartbeat thread to touch it
        assert lock.stale_reason(path, stale_s=60) == ""


@pytest.mark.parametrize("flock", ["supported", "unsupported"])
def test_a_bounded_wait_ends_in_one_line_naming_the_lock(tmp_path, monkeypatch, flock):
    """Rank 0 may wait only so long: the other ranks wait in a collective meanwhile (issue 22); a
    blocking flock (some NFS set-ups never return from it) could not be bounded."""
    out = tmp_path / "run"
    if flock == "unsupported":
        def enosys(*a, **k):
            raise OSError(errno.ENOSYS, "Function not implemented")
        monkeypatch.setattr(fcntl, "flock", enosys)
    with lock.exclusive(out, log=lambda m: None):
        with pytest.raises(lock.LockTimeout) as e:
            with lock.exclusive(out, log=lambda m: None, poll_s=0.05, max_wait_s=0.3):
                pytest.fail("took a held lock")
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "still held" in msg and "rerun" in msg
    with lock.exclusive(out, log=lambda m: None, max_wait_s=0.3):  # free again: taken at once
        pass
