"""Shared fixtures: tiny real datasets (Fashion-MNIST subsets, image folders) and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# write_odd_image_folder(root, classes, per_class, seed): a class folder of real files in every image mode (one copy,
# shared with benchmarks/gpu_smoke_checks.py)
from barlow.synthetic import write_odd_image_folder  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path(os.environ.get("BARLOW_FMNIST", "/usr/share/datasets/fashion-mnist"))


def pytest_configure(config):
    """Each xdist worker (`make test`: 2 on 2 cores) on its own core(s), inherited by the stages it starts.

    A stage takes every core of its affinity mask for intra-op threads (barlow.distributed.use_task_cpus) and its
    loader's workers: two workers' stages at 2 threads each on 2 cores spun against each other (measured here:
    tests/test_pretrain.py beside tests/test_probe.py + test_monitor.py, 272-279 s unpinned, 222 s pinned).
    BARLOW_TEST_PIN=0 turns it off."""
    worker, n = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0))
    if not worker or n < 2 or len(cpus) < n or os.environ.get("BARLOW_TEST_PIN", "1") == "0":
        return
    share = set(cpus[int(worker.removeprefix("gw")) % n::n])
    os.sched_setaffinity(0, share)
    if "torch" in sys.modules:  # its thread pool was sized before the mask changed
        sys.modules["torch"].set_num_threads(len(share))


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for a test's own gloo process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m barlow ...`` in a subprocess, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "barlow", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=timeout)


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """``barlow.cli.main`` in the test's own process, for error paths where a subprocess adds only its ~2 s of
    start-up (torch, torchvision, FFCV): the same exit status and stdout/stderr as ``run_cli``. An exception that
    escapes main (a traceback for a user) escapes here too and fails the test."""
    import contextlib
    import io

    from barlow import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["python", "-m", "barlow", *map(str, args)], rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def fmnist_tiny(tmp_path_factory) -> dict:
    """Real Fashion-MNIST: 384 train / 256 val images as .beton files (converted once per session)."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{FMNIST}: Fashion-MNIST missing; `make test` installs dataset-fashion-mnist")
    from barlow.convert import convert

    out = tmp_path_factory.mktemp("fmnist")
    convert("fashion_mnist", str(FMNIST), "train", out / "train.beton", limit=384, workers=1)
    convert("fashion_mnist", str(FMNIST), "val", out / "val.beton", limit=256, workers=1)
    return {"train": out / "train.beton", "val": out / "val.beton", "dir": out}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """tests/test_workflow.py's tiny_config() run through the real Snakemake workflow to the end, once per
    session (tests/test_workflow.py, tests/test_workflow_report.py); a test that edits it copies it first."""
    import yaml

    from tests.test_workflow import snakemake, tiny_config

    wd = tmp_path_factory.mktemp("wf")
    (wd / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    r = snakemake(wd)
    assert r.returncode == 0, r.stderr[-4000:]
    return wd, r


def write_image_folder(root: Path, classes=("cat", "dog"), per_class=6, size=(40, 30), seed=0) -> Path:
    """A small ImageNet-style tree of real JPEG/PNG files: root/{train,val}/<class>/<img>."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


# The longest modules, longest first. `make test` runs the non-SLURM tests on 2 pytest-xdist workers
# (--dist loadgroup --no-loadscope-reorder: a test, or an xdist_group, at a time, in this order), so
# the two smoke runs (~4 and ~3.5 min alone) start at once on different workers instead of ending
# the run one after the other. Order only: no test depends on it.
LONGEST_FIRST = ("test_smoke.py", "test_cifar.py", "test_workflow.py", "test_workflow_report.py", "test_pretrain.py",
                 "test_gpu_smoke.py", "test_checkpoint_formats.py", "test_train_step.py", "test_probe.py")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests marked `slurm` run last: their cluster's daemons then never run alongside the other
    tests, and it is stopped at the end of the session. Before them, the longest modules first."""
    if getattr(config.option, "loadgroup", False):
        _apply_xdist_groups(items)

    def rank(item):
        name = item.path.name
        return (item.get_closest_marker("slurm") is not None,
                LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST))
    items[:] = sorted(items, key=rank)  # stable: a module's own order is kept


def _apply_xdist_groups(items) -> None:
    """pytest-xdist 3.8's loadgroup marks a grouped item by suffixing ``item._nodeid`` with ``@group``; pytest 9.2
    derives ``item.nodeid`` from ``item._id`` instead, so the suffix was read by nothing and every xdist_group
    grouped nothing (measured: tests/test_workflow.py's finished_run was trained on both workers, ~45 s each).
    Here (after xdist's hook) the suffixed id becomes the item's id, which the scheduler splits on ``@``."""
    from _pytest.nodeid import coerce_node_id

    for item in items:
        suffixed = item.__dict__.get("_nodeid")
        if isinstance(suffixed, str) and "@" in suffixed and suffixed != item.nodeid:
            item._id = coerce_node_id(suffixed)
