"""Write files so that a crash at any moment leaves either the old file or the new one, never half.

A reader (Snakemake, a resumed job) must never take a partly written file as complete, so every
output goes to a temporary name in the same directory, is fsynced, and is renamed over the target
(rename is atomic on POSIX within one filesystem).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed over it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            tmp.unlink(missing_ok=True)  # give the space back before reporting
            raise disk_full(target) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(target: Path, needed: int | None = None):
    from barlow.errors import BadInput

    free = shutil.disk_usage(target.parent).free / 2**20
    need = f"needs about {needed / 2**20:.0f} MB, " if needed else ""
    kept = "the previous version is kept" if target.exists() else "nothing was written"
    return BadInput(f"{target}: disk full ({need}{free:.0f} MB free on {target.parent}); {kept}; free space and rerun")


def clean_stale(directory: str | os.PathLike) -> list[Path]:
    """Remove temporaries that a killed writer left behind (call only while no writer runs)."""
    stale = list(Path(directory).glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_torch(obj, target) -> None:
    import torch

    with atomic_path(target) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch reports a failed write as RuntimeError (varied messages), not OSError
            if shutil.disk_usage(tmp.parent).free < 64 * 2**20:
                raise OSError(errno.ENOSPC, str(e)) from None
            raise


def write_text(target, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target, obj) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")
