"""barlow.loader beyond what the stages' tests exercise."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_more_workers_than_cpus_load_on_the_cpus_there_are(fmnist_tiny):
    """A 1-CPU task (a pinned process, SLURM's --cpus-per-task 1) asking for 2 loader workers: numba refused FFCV's
    set_num_threads(2) with 'The number of threads must be between 1 and 1'."""
    code = ("import sys; from barlow.loader import make_loader, split_batch;"
            "(x,), y = split_batch(next(iter(make_loader(sys.argv[1], 64, train=False, workers=2))), 1);"
            "print(tuple(x.shape), len(y))")
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code, str(fmnist_tiny["train"])], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["(64,", "3,", "32,", "32)", "64"], r.stdout


def test_a_closed_iterator_has_no_thread_left(fmnist_tiny):
    """barlow.loader.close_iterator: FFCV's close() only sets a flag, and its thread would go on decoding (a process
    exiting then aborts); after close_iterator the thread has ended, with the epoch's batches still to come."""
    from barlow.loader import close_iterator, make_loader

    it = iter(make_loader(fmnist_tiny["train"], 16, workers=1, train=False, drop_last=False))
    next(it)  # 1 of 24 batches
    close_iterator(it)
    assert not it.is_alive()
