"""Disk space for a conversion: estimated before it starts, watched while it runs.

FFCV's DatasetWriter hands pages to worker processes and polls a shared counter until every sample
is done. When the disk fills, a worker dies on ENOSPC (or SIGBUS through a memory map) and the
counter never gets there: the writer waits forever. FFCV has no timeout or error path for this, so
``watch`` adds one: a thread that sees the output's filesystem full and the file no longer growing,
stops the writer's workers and interrupts the main thread with one disk-full line.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np

from barlow.errors import BadInput

SAMPLE = 16          # images encoded to estimate the bytes per image
MARGIN = 1.25        # page padding, allocation table, the estimate's spread
FULL_BELOW = 2**20   # "full": less free than this (FFCV writes in 8 MiB pages; tmpfs tests in 1 MiB)
STALLED_S = 3.0      # full and not growing for this long: a worker died


def image_bytes(img: np.ndarray, write_mode: str, max_resolution: int | None, quality: int, p_compress: float) -> float:
    """Bytes FFCV's RGBImageField stores for one image (raw pixels and/or JPEG at ``quality``)."""
    import cv2

    h, w = img.shape[:2]
    if max_resolution and max(h, w) > max_resolution:
        s = max_resolution / max(h, w)
        img = cv2.resize(img, (max(1, int(w * s)), max(1, int(h * s))), interpolation=cv2.INTER_AREA)
    raw = img.size
    if write_mode == "raw":
        return raw
    jpg = len(cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1])
    if write_mode == "proportion":
        return p_compress * jpg + (1 - p_compress) * raw
    return jpg  # jpg, smart (JPEG above its threshold: the large images that dominate the size)


def estimate(source, indices, options) -> int:
    """Bytes the .beton of ``source[indices]`` will take, from SAMPLE images spread over it."""
    picks = np.asarray(indices)[np.linspace(0, len(indices) - 1, min(SAMPLE, len(indices))).astype(int)]
    per = [image_bytes(source[int(i)][0], options.write_mode, options.max_resolution, options.jpeg_quality,
                       options.compress_probability) for i in picks]
    return int(len(indices) * (float(np.mean(per)) + 64) * MARGIN) + 2**20


def check(target: Path, needed: int, what: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < needed:
        raise BadInput(f"{what}: disk full for {target} (needs about {needed / 2**20:.0f} MB, "
                       f"{free / 2**20:.0f} MB free on {target.parent}); nothing was written; free space and rerun")


class _DiskFull(Exception):
    pass


@contextlib.contextmanager
def watch(tmp: Path, target: Path, what: str, poll_s: float = 0.5):
    """Run the body (FFCV's writer, in the main thread) under the disk watch."""
    done = threading.Event()
    fired = threading.Event()

    def size() -> int:
        try:
            return tmp.stat().st_size
        except OSError:
            return 0

    def watcher():
        last, since = size(), None
        while not done.wait(poll_s):
            now = size()
            grown, last = now != last, now
            full = shutil.disk_usage(tmp.parent).free < FULL_BELOW
            since = (since or time.time()) if full and not grown else None
            if since and time.time() - since > STALLED_S:
                for child in multiprocessing.active_children():
                    child.kill()
                fired.set()
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    def interrupt(signum, frame):
        if fired.is_set():
            raise _DiskFull()

    try:
        old = signal.signal(signal.SIGUSR1, interrupt)
    except ValueError:  # not the main thread: signals cannot reach it; run unwatched
        yield
        return
    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    try:
        yield
    except _DiskFull:
        tmp.unlink(missing_ok=True)
        raise BadInput(f"{what}: disk full while writing {target} (the writer stalled with "
                       f"{shutil.disk_usage(tmp.parent).free / 2**20:.0f} MB free on {target.parent}); the partial file "
                       "is removed; free space and rerun") from None
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGUSR1, old)

