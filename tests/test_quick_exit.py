"""barlow.quick_exit: the collector's objects are frozen at exit, after the other atexit handlers."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_the_objects_are_frozen_at_exit_and_later_handlers_still_run():
    # atexit runs handlers last-in first-out: `after` is registered before install, so it runs after the freeze
    r = _python("import atexit, gc\n"
                "atexit.register(lambda: print('after', gc.get_freeze_count() > 0))\n"
                "from barlow import quick_exit\n"
                "n = atexit._ncallbacks()\n"  # (coverage.py, when it measures the subprocess, has its own)
                "quick_exit.install(); quick_exit.install()\n"
                "atexit.register(lambda: print('before', gc.get_freeze_count()))\n"
                "print('added', atexit._ncallbacks() - n - 1)\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["added 1", "before 0", "after True"], r.stdout


def test_the_cli_and_a_stage_job_install_it():
    """`python -m barlow` installs it before anything else; so does a stage's job (submitit's process)."""
    main = (REPO / "barlow" / "__main__.py").read_text()
    assert main.index("quick_exit.install()") < main.index("from barlow.cli import main")
    r = _python("import atexit, gc\n"
                "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
                "from barlow import launch\n"
                "job = launch.StageJob(lambda env: 'done')\n"
                "print(job())\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["frozen", "True"], r.stdout
