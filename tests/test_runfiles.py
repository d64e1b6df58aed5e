"""What a run's files say (barlow.runfiles): a .beton's header, a log's one-line error, a job's requeues."""
from __future__ import annotations

import json

from barlow import runfiles


def test_beton_header_is_read_as_ffcv_reads_it(fmnist_tiny):
    from barlow.loader import beton_length

    assert runfiles.beton_images(fmnist_tiny["train"]) == beton_length(fmnist_tiny["train"]) == 384
    assert runfiles.beton_images(fmnist_tiny["dir"] / "nothing.beton") is None


def test_one_line_errors():
    assert runfiles.last_error("step 1/6\nerror: x.beton: missing\nwarning: y\n") == ("error", "error: x.beton: missing")
    tb = "Traceback (most recent call last):\n  File \"a.py\", line 1\nbarlow.errors.BadInput: too few images\n"
    assert runfiles.last_error(tb) == ("exception", "error: too few images")
    assert runfiles.last_error(tb.replace("barlow.errors.BadInput", "FloatingPointError")) == \
        ("exception", "FloatingPointError: too few images")
    assert runfiles.last_error("all fine\nValueError: printed, not raised\n") == ("", "")


def test_requeues_are_the_starts_of_rank_0_less_one(tmp_path):
    (tmp_path / "submitit").mkdir()
    (tmp_path / "job.json").write_text(json.dumps({"job_id": "77", "executor": "slurm", "tasks": 2}))
    job = runfiles.read_job(tmp_path)
    assert job.requeues() is None  # no log yet
    start = "submitit INFO (2026-01-01 00:00:00,000) - Starting with JobEnvironment(job_id=77, hostname=n1, ...)\n"
    (tmp_path / "submitit" / "77_0_log.out").write_text(start + "step 5/9\n" + start + start)  # the file is appended to
    assert job.requeues() == 2
