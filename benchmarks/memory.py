"""Figure ``peak_rss_mb``: peak resident memory of pretraining and of probing at the default settings.

Each stage runs as ``python -m barlow <stage> --executor inline`` (the same code the local
executor runs in its child, in one process: FFCV's workers are threads), and the peak RSS is that
child's ``ru_maxrss`` from ``os.wait4`` (the child and any descendants it waited for).

* pretrain: the fmnist_r18 preset (batch 128, 2 loader workers, channels_last, AdamW) with
  ``max_steps`` small (RSS is flat after the first steps; what grows with time is only the part of
  the memory-mapped .beton that has been touched, at most the file size, given in details).
* probe: the fmnist_r18 preset's default probe (cached: frozen features of all six heads extracted
  once into preallocated fp16 tensors) on all 60,000 train + 10,000 val images with ``epochs: 1``
  (the peak is the extraction; head epochs only gather batches from the same tensors).

The figure's value is the larger of the two, both measured; the peer is the machine's RAM,
ratio = RAM / peak (headroom, higher is better).
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
    from barlow.model import backbone
    from barlow.heads import Probes

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
    # The default probe with one head epoch: the peak is the extraction of the frozen features,
    # which the head epochs do not grow (they gather batches from the same tensors).
    pcfg = bc.resolve("fmnist_r18")
    pcfg["data"]["image_size"] = 32
    for p in pcfg["probe"]["passes"]:
        p["epochs"] = 1
    log(f"probe peak RSS: default probe (1 head epoch), {n_train} train + {n_val} val images ...")
    rss_probe, wall_probe = run_peak([PY, "-m", "barlow", "probe", "--config-json", json.dumps(pcfg), "--executor",
                                      "inline", "--backbone", str(work / "rnd" / "backbone.pth"), "--train", str(train),
                                      "--val", str(val), "--out", str(work / "probe.json")], work)
    log(f"  {rss_probe:.0f} MiB ({wall_probe:.0f} s)")
    fbytes = feature_bytes_per_image()
    value = max(rss_pre, rss_probe)
    mem = total_mem_mb()
    details = {
        "pretrain": {"peak_rss_mb": round(rss_pre, 1), "wall_s": round(wall_pre, 1), "max_steps": steps,
                     "train_images": n_train, "measured": True, "beton_mb": round(train.stat().st_size / 2**20, 1),
                     "note": "the .beton is memory-mapped (os_cache=True): pages touched over a whole epoch add up to "
                             "beton_mb more RSS (page cache, reclaimable)"},
        "probe": {"peak_rss_mb": round(rss_probe, 1), "wall_s": round(wall_probe, 1), "train_images": n_train,
                  "val_images": n_val, "measured": True, "head_epochs": 1,
                  "feature_bytes_per_image_fp16": fbytes,
                  "cached_features_mb": round((n_train + n_val) * fbytes / 2**20, 1)},
        "value_is": "max(pretrain, probe), both measured",
        "how": "python -m barlow <stage> --executor inline in a child; os.wait4 ru_maxrss",
        "machine_ram_mb": round(mem, 0), "load_avg_before": load_before, "load_avg_after": load(),
        "mode": "quick" if quick else "full",
    }
    emit(args, [figure("peak_rss_mb", value, "MiB", "machine RAM", mem, mem / value, details)])


if __name__ == "__main__":
    main()
