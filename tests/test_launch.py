"""barlow.launch and barlow.preflight: the sbatch script submitit writes, the memory a stage needs, how many
timeouts a job may requeue after, which pending reasons mean "never starts", how a stage's own error
reaches the waiting process, and that the call a job runs pickles without the stage's imports (no SLURM needed)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import submitit

from barlow import launch, preflight
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
    monkeypatch.setattr(preflight, "sinfo_nodes", lambda: (nodes, "gpu"))
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
    assert "--kill-on-bad-exit=1" in srun.split()  # one crashed rank ends the step (issue 22)
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
    monkeypatch.setattr(preflight, "machine_mem_gb", lambda: 16.0)
    with pytest.raises(BadInput, match=r"launcher\.probe: the cached probe needs ~123 GB of memory, this machine "
                                        r"has 16 GB"):
        launch.run(_never_called, {"executor": "inline"}, tmp_path, "probe-x", stage="probe",
                   need_mem_gb=123.0, need_why="the cached probe")


def _never_called(env=None):
    raise AssertionError("the stage ran although its memory need was refused")


def test_setup_lines_and_env_come_before_srun(fake_slurm):
    launcher = {**LAUNCHER, "setup": ["module load cuda/12.4", "ulimit -n 4096"],
                "env": {"NCCL_SOCKET_IFNAME": "ib0", "BT_QUOTED": "a b'c $HOME;x"}}
    script = _script(launch._executor(launcher, fake_slurm / "submitit", "pretrain-x", "pretrain"))
    lines = script.splitlines()
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    setup = [lines.index(x) for x in ("module load cuda/12.4", "ulimit -n 4096", "export NCCL_SOCKET_IFNAME=ib0")]
    assert setup == sorted(setup) and setup[-1] < srun, script  # as written, env after setup, all before srun
    quoted = next(line for line in lines if line.startswith("export BT_QUOTED="))
    shown = subprocess.run(["bash", "-c", f'{quoted}; printf %s "$BT_QUOTED"'], capture_output=True, text=True,
                           timeout=10).stdout
    assert shown == "a b'c $HOME;x"  # quoted, not expanded or split


@pytest.mark.parametrize("env, where", [({"1BAD": "x"}, "'1BAD'"), ({"NCCL IB": "x"}, "'NCCL IB'"),
                                        ({"NCCL_IB_TIMEOUT": 22}, "NCCL_IB_TIMEOUT")])
def test_bad_env_is_one_line_naming_the_key(fake_slurm, env, where):
    with pytest.raises(BadInput) as e:
        launch._executor({**LAUNCHER, "env": env}, fake_slurm / "submitit", "pretrain-x", "pretrain")
    assert str(e.value).startswith("launcher.pretrain.env") and where in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("given, hours, timeout_min, expected", [
    (None, None, 240, launch.DEFAULT_MAX_REQUEUES),  # nothing known: the generous default
    (None, 100.0, 240, 40),  # 300-epoch run, 4 h limit: ceil(25 x 1.5) + 2
    (None, 100.0, 480, 21),  # 8 h limit: ceil(12.5 x 1.5) + 2
    (None, 0.5, 1440, 3),  # short run: ceil(0.03 x 1.5) + 2
    (None, 0.0, 1440, 2),
    (5, 100.0, 240, 5),  # the user's value wins, also 0
    (0, None, 240, 0),
])
def test_max_requeues(given, hours, timeout_min, expected):
    assert launch.max_requeues({"max_requeues": given, "timeout_min": timeout_min}, hours) == expected


def test_max_requeues_reaches_submitit(fake_slurm, capsys):
    ex = launch._executor(dict(LAUNCHER), fake_slurm / "a", "pretrain-x", "pretrain", expected_hours=100.0)
    assert ex._executor.max_num_timeout == 17  # ceil(100 h / 600 min x 1.5) + 2; submitit's default is 3
    assert "launcher.pretrain.max_requeues not set: allowing 17 timeouts" in capsys.readouterr().out
    ex = launch._executor({**LAUNCHER, "max_requeues": 7}, fake_slurm / "b", "pretrain-x", "pretrain",
                          expected_hours=100.0)
    assert ex._executor.max_num_timeout == 7
    ex = launch._executor({"executor": "local"}, fake_slurm / "c", "pretrain-x", "pretrain")
    assert ex._executor.max_num_timeout == launch.DEFAULT_MAX_REQUEUES


# Reason strings as SLURM 22.05 spells them (src/common/slurm_protocol_defs.c, job_reason_string)
NEVER = ["QOSMaxWallDurationPerJobLimit", "QOSMaxCpuPerJobLimit", "QOSMaxNodePerJobLimit", "QOSMaxGRESPerJob",
         "QOSMaxMemoryPerJob", "QOSMaxCpuMinutesPerJobLimit", "QOSMaxGRESPerNode", "QOSMaxCpuPerNode",
         "QOSMaxBillingPerJob", "QOSMinCpuNotSatisfied", "QOSMinGRES", "AssocMaxCpuPerJobLimit",
         "AssocMaxWallDurationPerJobLimit", "AssocMaxNodePerJobLimit", "AssocMaxGRESPerJob", "AssocMaxMemPerJob",
         "AssocMaxCpuMinutesPerJobLimit", "AssocMaxBBMinutesPerJob", "AssocMaxMemPerNode"]
# ... and reasons that clear as other jobs end (or an admin acts): waiting is right
WAITS = ["Priority", "Resources", "None", "Dependency", "BeginTime", "ReqNodeNotAvail", "JobHeldUser",
         "QOSGrpCpuLimit", "QOSGrpGRES", "QOSGrpNodeLimit", "AssocGrpCpuLimit", "AssocGrpGRES",
         "AssocGrpCPUMinutesLimit", "QOSMaxJobsPerUserLimit", "QOSMaxCpuPerUserLimit", "QOSMaxGRESPerUser",
         "QOSMaxSubmitJobPerUserLimit", "AssocMaxJobsLimit", "AssocMaxSubmitJobLimit", "MaxCpuPerAccount",
         "MaxGRESPerAccount", "QOSMaxNodePerUserLimit", "QOSJobLimit", "QOSResourceLimit", "AssociationJobLimit"]


@pytest.mark.parametrize("reason", NEVER)
def test_per_job_qos_and_association_limits_never_start(reason):
    msg = preflight.never_starts(reason, "123", "pretrain", qos="short", account="proj")
    assert msg.startswith("launcher.pretrain: SLURM will never start job 123: ") and "\n" not in msg, msg
    assert reason in msg and "cancelled" in msg, msg
    assert ("QOS 'short'" in msg and "launcher.pretrain.qos" in msg) if reason.startswith("QOS") else \
        ("account 'proj'" in msg and "launcher.pretrain.account" in msg), msg


@pytest.mark.parametrize("reason", WAITS)
def test_limits_that_clear_by_waiting_are_waited_on(reason):
    assert preflight.never_starts(reason, "123", "pretrain") == ""


def test_never_starts_names_the_setting_to_change():
    wall = preflight.never_starts("QOSMaxWallDurationPerJobLimit", "9", "pretrain", qos="q1")
    assert "the QOS 'q1' limit MaxWall per job" in wall and "lower launcher.pretrain.timeout_min" in wall, wall
    gpus = preflight.never_starts("AssocMaxGRESPerJob", "9", "probe")
    assert "its association limit MaxTRES gres per job" in gpus, gpus
    assert "lower launcher.probe.nodes / launcher.probe.gpus_per_node" in gpus, gpus
    mins = preflight.never_starts("QOSMaxCpuMinutesPerJobLimit", "9", "pretrain")
    assert "MaxTRESMins cpu per job" in mins and "launcher.pretrain.timeout_min / launcher.pretrain.nodes" in mins
    low = preflight.never_starts("QOSMinCpuNotSatisfied", "9", "pretrain")
    assert "MinTRES cpu" in low and "raise launcher.pretrain.nodes" in low, low
    assert "partition" in preflight.never_starts("PartitionTimeLimit", "9", "pretrain")  # as before


class _Task:
    """A task of a finished job: its ``result()`` returns ``value`` or raises ``error``."""

    def __init__(self, error=None, value=None):
        self.error, self.value = error, value
        self.paths = type("P", (), {"stderr": "/logs/err"})()

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


class _Job:
    job_id = "77"


def test_a_failed_other_rank_is_named_when_rank_0_was_killed():
    """srun's --kill-on-bad-exit kills rank 0 when rank 1 fails: the error shown is rank 1's."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    trace = ("Job (task=1) failed during processing with trace:\n----------------------\nTraceback (most recent call "
             "last):\n  File \"x\", line 1\nRuntimeError: boom\n\n----------------------\nYou can check full logs with "
             "'job.stderr(1)' and 'job.stdout(1)'or at paths:\n  - /logs/err\n  - /logs/out")  # submitit 1.5's text
    tasks = [_Task(UncompletedJobError("Job 77 (task: 0) has not produced any output")), _Task(FailedJobError(trace))]
    with pytest.raises(RuntimeError, match=r"^job 77 failed on rank 1 \(RuntimeError: boom\), which ended the other "
                                           r"ranks; its log: /logs/err$"):
        launch._outcome(_Job(), tasks)
    tasks[1] = _Task(value=launch.StageError("BadInput", "data.path: missing", rank=1))  # rank 1's own error
    with pytest.raises(BadInput, match=r"^data\.path: missing$"):
        launch._outcome(_Job(), tasks)
    tasks[1] = _Task(UncompletedJobError("no output"))  # nobody has a result: SLURM ended the job
    with pytest.raises(RuntimeError, match=r"^job 77 ended without a result \(Job 77 \(task: 0\) has not produced "
                                           r"any output\); see /logs/err; rerun"):
        launch._outcome(_Job(), tasks)


def test_rank_0s_own_stage_error_is_its_one_line():
    """Rank 0's StageError is raised as its one line, even when the other ranks were killed after it."""
    from submitit.core.utils import UncompletedJobError

    said = launch.StageError("BadInput", "pretrain.batch_size 512: too big; lower it")
    with pytest.raises(BadInput, match=r"^pretrain\.batch_size 512: too big; lower it$"):
        launch._outcome(_Job(), [_Task(value=said), _Task(UncompletedJobError("killed"))])
    nan = launch.StageError("FloatingPointError", "loss is nan at step 3")
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 3$"):
        launch._outcome(_Job(), [_Task(value=nan)])
    assert launch._outcome(_Job(), [_Task(value="ok"), _Task(value="ok too")]) == "ok"


def test_a_crash_that_is_not_ours_names_the_log_not_a_traceback_line():
    """A traceback is no longer read for our errors: a BadInput that got out as a crash (not a value) is a crash,
    named as one (submitit's FailedJobError is a subclass of UncompletedJobError: not 'ended without a result')."""
    from submitit.core.utils import FailedJobError

    with pytest.raises(RuntimeError, match=r"^job 77 failed; its log: /logs/err$"):
        launch._outcome(_Job(), [_Task(FailedJobError("Traceback ...\nbarlow.errors.BadInput: data.path: missing"))])


def _bad_stage(env=None):
    raise BadInput("data.path /nowhere.beton: no such file; convert the split first")


def test_bad_input_in_a_local_job_arrives_as_its_one_line(tmp_path, monkeypatch, capsys):
    """A real LocalExecutor job: the stage raises BadInput in the child process, which returns it as a StageError
    and exits 1; the waiting process raises the same one line from that value."""
    from tests.conftest import REPO

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the child imports this module to unpickle _bad_stage
    ex = launch._executor({"executor": "local", "cpus_per_task": 1}, tmp_path / "submitit", "bad-x", "test")
    job = ex.submit(launch.StageJob(_bad_stage))
    with pytest.raises(BadInput) as e:
        launch._wait(job, poll=0.1, stage="test")
    assert str(e.value) == "data.path /nowhere.beton: no such file; convert the split first"
    assert job.result() == launch.StageError("BadInput", str(e.value), rank=0)  # a value, not a traceback
    err = capsys.readouterr().err  # the job's log, echoed: the traceback is still there for `barlow status`
    assert "barlow.errors.BadInput: data.path /nowhere.beton" in err, err
    with pytest.raises(BadInput, match=r"^data\.path /nowhere\.beton: no such file"):  # the whole path: run()
        launch.run(_bad_stage, {"executor": "local", "cpus_per_task": 1}, tmp_path / "run", "bad-y", stage="test")


class _FakeSlurmJob(submitit.SlurmJob):
    """A 2-task SLURM job that is done after ``polls`` polls, without a cluster (no watcher, no sacct)."""

    def __init__(self, folder, polls: int):  # noqa: D107 - deliberately not SlurmJob's
        self._job_id, self._polls, self._cancel_at_deletion = "55", polls, False
        self._subs = [_Task(value=f"rank {k}'s result") for k in range(2)]
        for k, sub in enumerate(self._subs):
            sub.paths = submitit.core.utils.JobPaths(folder, "55", task_id=k)
        for sub in self._subs:
            sub.paths.folder.mkdir(parents=True, exist_ok=True)
            sub.paths.result_pickle.touch()
        self._subs[1].paths.stdout.write_text("hello from rank 1\npartial")

    num_tasks = property(lambda self: 2)

    def task(self, task_id):
        return self._subs[task_id]

    def done(self, force_check=False):
        self._polls -= 1
        return self._polls < 0


class _Clock:
    """time for launch._wait: every reading is 20 s later, so the pending-reason checks come at once."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 20.0
        return self.now

    def sleep(self, s):
        pass


def test_wait_streams_on_through_reason_checks_of_a_job_that_may_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launch, "time", _Clock())
    checked = []
    monkeypatch.setattr(preflight, "pending", lambda job_id: checked.append(job_id) or ("Priority", "", ""))
    assert launch._wait(_FakeSlurmJob(tmp_path, polls=6), poll=0.0, stage="pretrain") == "rank 0's result"
    assert len(checked) >= 2  # asked squeue, more than once, and waited on
    assert capsys.readouterr().out.splitlines() == ["[rank 1] hello from rank 1", "[rank 1] partial"]


def test_wait_cancels_a_job_over_a_per_job_qos_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "time", _Clock())
    monkeypatch.setattr(preflight, "pending", lambda job_id: ("QOSMaxNodePerJobLimit", "q1", "proj"))
    ran = []
    monkeypatch.setattr(preflight.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    with pytest.raises(BadInput, match=r"^launcher\.pretrain: SLURM will never start job 55: QOSMaxNodePerJobLimit, "
                                       r"the QOS 'q1' limit MaxTRES node per job, .* lower launcher\.pretrain\.nodes "
                                       r"or ask for another qos"):
        launch._wait(_FakeSlurmJob(tmp_path, polls=100), poll=0.0, stage="pretrain")
    assert ran == [["scancel", "55"]]


def test_a_task_that_returned_its_error_still_exits_1(tmp_path):
    """As when it raised: SLURM records the job as FAILED, srun's --kill-on-bad-exit ends the other ranks."""
    from tests.conftest import REPO

    code = "from barlow.launch import StageJob; from tests.test_launch import _bad_stage; print(StageJob(_bad_stage)())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip().endswith("StageError(kind='BadInput', message='data.path /nowhere.beton: no such file; "
                                        "convert the split first', rank=0)"), done.stdout
    assert done.stderr.rstrip().endswith("barlow.errors.BadInput: data.path /nowhere.beton: no such file; convert "
                                         "the split first"), done.stderr


def _echo(*args, **kwargs):
    return args, kwargs


def test_a_stage_call_pickles_without_importing_its_stage():
    """The launcher pickles StageJob(StageCall(...)) for submitit: neither pickling nor unpickling imports the
    stage's module (torch, FFCV); calling it does, and passes the task's env on."""
    from tests.conftest import REPO

    code = ("import sys, cloudpickle\n"
            "from barlow.cli import StageCall\nfrom barlow.launch import StageJob\n"
            "call = StageCall('barlow.pretrain:pretrain', ({'model': {}}, 't.beton', 'o/backbone.pth'),\n"
            "                 {'identity': None})\n"
            "job = cloudpickle.loads(cloudpickle.dumps(StageJob(call, 5.0)))\n"
            "assert job.fn == call and job.pg_timeout_min == 5.0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ffcv') or m == 'barlow.pretrain'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    from barlow.cli import StageCall

    call = StageCall("tests.test_launch:_echo", (1, "a"), {"k": 2})
    assert call(env="E") == ((1, "a"), {"k": 2, "env": "E"})


@pytest.mark.parametrize("arch, size, projector, bias", [
    ("resnet18", 32, (2048, 2048), True), ("resnet34", 32, (512,), True), ("resnet50", 32, (), True),
    ("resnet101", 40, (1024, 256), False), ("resnet152", 32, (8192, 8192, 8192), True),
    ("resnet50", 224, (8192, 8192, 8192), False),  # the published pooling table
    ("resnet18", 96, (2048, 2048), False)])
def test_counts_without_torch_equal_the_meta_device_measurement(arch, size, projector, bias):
    """What the launcher sizes a job with (probe dims, parameter counts; and FLOPs, for the requeue budget) is
    counted from the layer list: exactly what barlow.estimate_costs measures on the meta device."""
    from barlow.estimate_costs import counted, model_costs, model_memory

    c, mem = counted(arch, size, projector, bias), model_memory(arch, size, projector, bias)
    assert {k: c[k] for k in ("backbone", "projector", "dims")} == model_costs(arch, size, projector, bias)
    assert c["params"] == {"backbone": mem["backbone"], "projector": mem["projector"]}
