"""Shared helpers: machine description, commit, dataset cache, ABAB timing, the figure record."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path(os.environ.get("BARLOW_FMNIST", "/usr/share/datasets/fashion-mnist"))
DEFAULT_CACHE = Path(os.environ.get("BARLOW_BENCH_CACHE", "/tmp/barlow-bench"))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def commit() -> str:
    """``git rev-parse --short HEAD`` (+ ``-dirty`` when tracked files differ), via the project's helper."""
    try:
        from barlow.provenance import git_commit

        return git_commit()
    except Exception:  # noqa: BLE001
        return "unknown"


_THREADS_AT_START: list[int] = []


def machine() -> str:
    """CPU, cores, RAM, Python, torch and its intra-op threads (as this process started with them)."""
    import torch

    if not _THREADS_AT_START:
        _THREADS_AT_START.append(torch.get_num_threads())
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return (f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__} ({_THREADS_AT_START[0]} threads)")


def total_mem_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load() -> list[float]:
    """1/5/15-minute load averages: the machine is shared, so every figure records them."""
    return [round(x, 2) for x in os.getloadavg()]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def alternate(a: Callable[[], float], b: Callable[[], float], reps: int, log=None) -> tuple[list[float], list[float]]:
    """Run a, b, a, b, ... ``reps`` times each; each call returns its own measurement."""
    ra, rb = [], []
    for i in range(reps):
        ra.append(a())
        rb.append(b())
        if log:
            log(f"  rep {i + 1}/{reps}: A {ra[-1]:.4g}  B {rb[-1]:.4g}")
    return ra, rb


def figure(name: str, value: float, unit: str, peer: str | None, peer_value: float | None,
           ratio: float | None, details: dict) -> dict:
    return {
        "name": name, "value": _round(value), "unit": unit, "peer": peer,
        "peer_value": _round(peer_value), "ratio": _round(ratio), "details": details,
        "measured_at": now_iso(), "machine": machine(), "commit": commit(),
    }


def _round(x):
    if x is None or not isinstance(x, (int, float)):
        return x
    return float(f"{x:.4g}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_dir(args) -> Path:
    d = Path(args.cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d


def fmnist_beton(cache: Path, split: str, limit: int | None) -> Path:
    """Fashion-MNIST ``split`` as a .beton (first ``limit`` images), converted once into the cache."""
    from barlow.convert import convert

    path = cache / f"fmnist_{split}_{limit or 'all'}.beton"
    if not path.is_file():
        t0 = time.time()
        convert("fashion_mnist", str(FMNIST), split, path, limit=limit, workers=2)
        log(f"converted {path} in {time.time() - t0:.1f} s")
    return path


def base_parser(doc: str) -> argparse.ArgumentParser:
    machine()  # records torch's thread count before anything (FFCV's writer, ...) changes it
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where .beton files and scratch runs go")
    p.add_argument("--json", help="write the figure(s) (a JSON list) here instead of stdout")
    return p


def emit(args, figures: list[dict]) -> None:
    text = json.dumps(figures, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
