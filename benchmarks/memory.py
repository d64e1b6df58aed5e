"""Figure ``peak_rss_mb``: peak resident memory of pretraining and of probing at the default settings.

Each stage runs as ``python -m barlow <stage> --executor inline`` (the same code the local
executor runs in its child, in one process: FFCV's workers are threads), and the peak RSS is that
child's ``ru_maxrss`` from ``os.wait4`` (the child and any descendants it waited for).

* pretrain: the fmnist_r18 preset (batch 128, 2 loader workers, channels_last, AdamW) with
  ``max_steps`` small (RSS is flat after the first steps; what grows with time is only the part of
  the memory-mapped .beton that has been touched, at most the file size, given in details).
* probe: the fmnist_r18 preset's default probe (cached: frozen features of all six heads extracted
  once, fp16) with ``epochs: 1`` and ``limit_train`` at two sizes (train >= 2 x val, so the peak is the
  train extraction's). The full-data peak (60,000 train) is an ESTIMATE: the larger measurement plus
  2 x the fp16 feature bytes per image (``_extract`` holds the per-batch list and its ``torch.cat``)
  for each further image; the two measurements' own slope is reported as a check.

The figure's value is the larger of the two (pretrain measured, probe extrapolated to the full data);
the peer is the machine's RAM, ratio = RAM / peak (headroom, higher is better).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import base_parser, cache_dir, emit, figure, fmnist_beton, load, log, total_mem_mb

PY = sys.executable


def run_peak(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS MiB, wall s) of a child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({p.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return ru.ru_maxrss / 1024.0, time.perf_counter() - t0


def feature_bytes_per_image() -> int:
    """fp16 bytes of the six cached probe features of one 32 px image (ResNet-18)."""
    import torch

    from barlow.model import backbone
    from barlow.probe import Probes

    return 2 * sum(Probes(backbone("resnet18"), 32).dims().values())


def main(argv=None):
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, help="pretraining max_steps (default 5 quick / 40 full)")
    args = ap.parse_args(argv)
    quick = args.quick
    load_before = load()
    from barlow import config as bc

    cache = cache_dir(args)
    work = Path(tempfile.mkdtemp(prefix="rss-", dir=cache))
    train_n = 4096 if quick else None  # full: all 60,000 images, as the default pipeline converts them
    val_n = 512 if quick else None
    train, val = fmnist_beton(cache, "train", train_n), fmnist_beton(cache, "val", val_n)
    from barlow.loader import beton_length

    n_train, n_val = beton_length(train), beton_length(val)
    steps = args.steps or (5 if quick else 40)

    cfg = bc.resolve("fmnist_r18", {"pretrain": {"max_steps": steps, "checkpoint_every_steps": 10_000}})
    cfg["data"]["image_size"] = 32
    pre_cfg = json.dumps({k: cfg[k] for k in ("model", "data", "pretrain")})
    log(f"pretrain peak RSS: {steps} steps on {n_train} images ...")
    rss_pre, wall_pre = run_peak([PY, "-m", "barlow", "pretrain", "--config-json", pre_cfg, "--executor", "inline",
                                  "--train", str(train), "--out", str(work / "pre" / "backbone.pth")], work)
    log(f"  {rss_pre:.0f} MiB ({wall_pre:.0f} s)")

    # a random-init backbone for probing (what the random_init experiment's pretrain writes)
    rnd = bc.resolve("fmnist_r18", {"pretrain": {"init": "random"}})
    rnd["data"]["image_size"] = 32
    subprocess.run([PY, "-m", "barlow", "pretrain", "--config-json", json.dumps({k: rnd[k] for k in ("model", "data", "pretrain")}),
                    "--executor", "inline", "--train", str(train), "--out", str(work / "rnd" / "backbone.pth")],
                   cwd=work, check=True, capture_output=True)
    sizes = [1024, 2048] if quick else [20000, 30000]  # >= 2 x val: the train features' torch.cat is the peak
    probe_runs = []
    for limit in sizes:
        pcfg = bc.resolve("fmnist_r18", {"probe": {"limit_train": limit}})
        pcfg["data"]["image_size"] = 32
        for p in pcfg["probe"]["passes"]:
            p["epochs"] = 1
        log(f"probe peak RSS: default probe, limit_train {limit}, {n_val} val ...")
        rss, wall = run_peak([PY, "-m", "barlow", "probe", "--config-json", json.dumps(pcfg), "--executor", "inline",
                              "--backbone", str(work / "rnd" / "backbone.pth"), "--train", str(train), "--val", str(val),
                              "--out", str(work / f"probe{limit}.json")], work)
        log(f"  {rss:.0f} MiB ({wall:.0f} s)")
        probe_runs.append({"limit_train": min(limit, n_train), "val": n_val, "peak_rss_mb": round(rss, 1), "wall_s": round(wall, 1)})
    (a, b) = probe_runs
    slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["limit_train"] - a["limit_train"])  # MiB per train image
    full_train, full_val = 60000, 10000
    c = a["peak_rss_mb"] - slope * (a["limit_train"] + a["val"])
    est_linear = c + slope * (full_train + full_val)
    fbytes = feature_bytes_per_image()
    # Anchored estimate: the largest measurement plus the analytic growth of the peak, which is the train
    # features held twice (the per-batch chunk list and their torch.cat) while train >= 2 x val.
    analytic_slope = 2 * fbytes / 2**20
    est_full = b["peak_rss_mb"] + analytic_slope * (full_train - b["limit_train"])
    value = max(rss_pre, est_full)
    mem = total_mem_mb()
    details = {
        "pretrain": {"peak_rss_mb": round(rss_pre, 1), "wall_s": round(wall_pre, 1), "max_steps": steps,
                     "train_images": n_train, "measured": True, "beton_mb": round(train.stat().st_size / 2**20, 1),
                     "note": "the .beton is memory-mapped (os_cache=True): pages touched over a whole epoch add up to "
                             "beton_mb more RSS (page cache, reclaimable)"},
        "probe": {"runs": probe_runs, "measured_slope_mb_per_image": round(slope, 4),
                  "analytic_slope_mb_per_image": round(analytic_slope, 4),
                  "estimated_full_mb": round(est_full, 1), "estimate_for": f"{full_train} train images (+ val)",
                  "estimated_full_mb_linear_fit": round(est_linear, 1),
                  "measured": False, "method": "largest measured run + analytic slope (2 x fp16 feature bytes per train "
                                               "image) x the remaining train images; the plain linear fit of the two runs "
                                               "is given beside it (noisy at quick sizes)",
                  "feature_bytes_per_image_fp16": fbytes,
                  "analytic_peak_features_mb": round(2 * full_train * fbytes / 2**20, 1),
                  "analytic_note": "peak holds the train features twice (chunk list + torch.cat) in _extract"},
        "value_is": "max(pretrain measured, probe estimated at full data)",
        "how": "python -m barlow <stage> --executor inline in a child; os.wait4 ru_maxrss",
        "machine_ram_mb": round(mem, 0), "load_avg_before": load_before, "load_avg_after": load(),
        "mode": "quick" if quick else "full",
    }
    emit(args, [figure("peak_rss_mb", value, "MiB", "machine RAM", mem, mem / value, details)])


if __name__ == "__main__":
    main()
