"""barlow.launch: the sbatch script submitit writes, and the memory a stage needs (no SLURM needed)."""
from __future__ import annotations

import os
import re

import pytest

from barlow import launch
from barlow.errors import BadInput


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch and srun on PATH (never run: the script is only rendered), and a cluster whose sinfo says
    partition gpu has two nodes of 64 CPUs, 512 GB and 8 GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    nodes = {"gpu": {"g1": (64, 512 * 1024, 8, 2880.0), "g2": (64, 512 * 1024, 8, 2880.0)}}
    monkeypatch.setattr(launch, "_sinfo_nodes", lambda: (nodes, "gpu"))
    return tmp_path


def _script(ex) -> str:
    return ex._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")


LAUNCHER = {"executor": "slurm", "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 7,
            "timeout_min": 600}


def test_sbatch_script_passes_cpus_per_task_to_srun(fake_slurm):
    script = _script(launch._executor(dict(LAUNCHER), fake_slurm / "submitit", "pretrain-x", "pretrain"))
    assert "#SBATCH --cpus-per-task=7" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=7" in srun.split()
    setup = script.index("export SRUN_CPUS_PER_TASK=7")
    assert setup < script.index(srun)  # exported before srun starts the tasks
    assert "#SBATCH --mem" not in script  # nothing asked for: SLURM's default


def test_needed_memory_becomes_mem_gb(fake_slurm, capsys):
    ex = launch._executor(dict(LAUNCHER), fake_slurm / "submitit", "probe-x", "probe", need_mem_gb=130.2,
                          need_why="the cached probe")
    assert "#SBATCH --mem=131GB" in _script(ex)
    assert "launcher.probe.mem_gb not set: asking for 131 GB" in capsys.readouterr().out


def test_users_mem_gb_wins_with_a_warning(fake_slurm, capsys):
    ex = launch._executor({**LAUNCHER, "mem_gb": 100}, fake_slurm / "submitit", "probe-x", "probe",
                          need_mem_gb=130.2, need_why="the cached probe")
    assert "#SBATCH --mem=100GB" in _script(ex)
    assert "warning: launcher.probe.mem_gb 100 is below the ~130 GB" in capsys.readouterr().out


def test_no_node_can_hold_the_needed_memory(fake_slurm):
    with pytest.raises(BadInput) as e:
        launch._executor(dict(LAUNCHER), fake_slurm / "submitit", "probe-x", "probe", need_mem_gb=600.0,
                         need_why="the cached probe (features float16)")
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(r"launcher\.probe\.mem_gb: not set, and the cached probe .* needs ~600 GB per node, but the "
                     r"largest node in partition gpu has 512\.0 GB", msg), msg


def test_local_run_refused_when_the_machine_is_too_small(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "_machine_mem_gb", lambda: 16.0)
    with pytest.raises(BadInput, match=r"launcher\.probe: the cached probe needs ~123 GB of memory, this machine "
                                        r"has 16 GB"):
        launch.run(_never_called, {"executor": "inline"}, tmp_path, "probe-x", stage="probe",
                   need_mem_gb=123.0, need_why="the cached probe")


def _never_called(env=None):
    raise AssertionError("the stage ran although its memory need was refused")
