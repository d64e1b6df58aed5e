"""Which 2-epoch recipe makes the default's table show what Barlow Twins buys (issue 25)?

Each trial is the default experiment as it was (`fmnist_r18_v1` now: 2 epochs, batch 128, warmup 0.2, crops
30-100 %, seed 0) with a few settings changed, run for real through the pipeline (`snakemake --cores 2 --configfile <trial>/config.yaml`)
into its own results folder, with the default run's converted `.beton` files hard-linked in (so no
trial converts). `random_init` is the yardstick: the default config's random-init experiment.

    .venv/bin/python -m benchmarks.studies.default_recipe run warmup1.5 lr2e-3 ...   # trials, in order
    .venv/bin/python -m benchmarks.studies.default_recipe report                     # table + plot

`report` writes default_recipe.md, .json and .png beside this file from every finished trial under
--root, with each trial's commit, machine and time. Trials take ~8 min each on the 2-core machine
and must run one at a time (two CPU-heavy runs on 2 cores slow each other and share nothing).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from barlow.provenance import git_commit

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = REPO.parent / "recipe_trials"
HEADS = ("feature1", "feature2", "feature3", "feature4", "feature5", "avgpool")
# The recipe the trials change: the default when they ran (fmnist_r18 until 2026-12-03, now named fmnist_r18_v1;
# the new default is its trial warmup1.5_crop0.7).
BASE = "fmnist_r18_v1"
RANDOM = {"pretrain": {"init": "random"}, "model": {"zero_init_residual": False}}
WARM = {"warmup_epochs": 1.5}

# name -> the experiment's overrides on fmnist_r18. Why each: the study's README section.
TRIALS: dict[str, dict] = {
    "random_init": RANDOM,
    "default": {},
    "warmup1.5": {"pretrain": WARM},
    "warmup1.5_lr2e-3": {"pretrain": {**WARM, "lr": 0.002}},
    "warmup1.5_lr8e-3": {"pretrain": {**WARM, "lr": 0.008}},
    "warmup1.5_wd0.1": {"pretrain": {**WARM, "weight_decay": 0.1}},
    "warmup1.5_crop0.5": {"pretrain": {**WARM, "augment": {"view1": {"scale": [0.5, 1.0]},
                                                           "view2": {"scale": [0.5, 1.0]}}}},
    "warmup1.5_lambd0.02": {"pretrain": {**WARM, "lambd": 0.02}},
    "warmup1.0_lr2e-3": {"pretrain": {"warmup_epochs": 1.0, "lr": 0.002}},
    "warmup2.0": {"pretrain": {"warmup_epochs": 2.0, "final_lr_ratio": 1.0}},
    "warmup1.5_proj2048": {"pretrain": WARM, "model": {"projector": [2048, 2048, 2048]}},
    # BT from the random-init row's own starting point (torchvision's init, no zero-init residual)
    "nozero": {"model": {"zero_init_residual": False}},
    "warmup1.5_nozero": {"pretrain": WARM, "model": {"zero_init_residual": False}},
    # crops of 50-100 % of the image (the default's 30-100 % destroys too much of a 28-px garment, early on)
    "warmup1.5_crop0.5_nozero": {"pretrain": {**WARM, "augment": {"view1": {"scale": [0.5, 1.0]},
                                                                  "view2": {"scale": [0.5, 1.0]}}},
                                 "model": {"zero_init_residual": False}},
    "warmup1.5_crop0.7": {"pretrain": {**WARM, "augment": {"view1": {"scale": [0.7, 1.0]},
                                                           "view2": {"scale": [0.7, 1.0]}}}},
}

def _trial_config(name: str, root: Path) -> Path:
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    folder = root / name
    cfg = {
        "results": str(folder),
        "datasets": base["datasets"],
        "experiments": {"trial": {"dataset": "fmnist", "preset": BASE, "overrides": TRIALS[name]}},
        "launcher": base["launcher"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _link_data(folder: Path, source: Path) -> None:
    """The default run's converted files, hard-linked so the trial's convert jobs are already done."""
    dest = folder / "data" / "fmnist"
    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if not (dest / f.name).exists():
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)


def run(names: list[str], root: Path, data: Path) -> int:
    if not (data / "train.beton").exists():
        sys.exit(f"error: no {data}/train.beton: run `make run` (or the convert stage) first, or pass --data")
    for name in names:
        if name not in TRIALS:
            sys.exit(f"error: unknown trial {name!r}; known: {', '.join(TRIALS)}")
    for name in names:
        cfg = _trial_config(name, root)
        _link_data(cfg.parent, data)
        started = datetime.now(timezone.utc)
        t0 = time.monotonic()
        with open(cfg.parent / "snakemake.log", "a") as log:  # a second run of a trial keeps the first's log
            rc = subprocess.call([str(Path(sys.executable).parent / "snakemake"), "--cores", "2",
                                  "--configfile", str(cfg)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        record = {"trial": name, "overrides": TRIALS[name], "rc": rc, "wall_s": round(time.monotonic() - t0, 1),
                  "started": started.isoformat(timespec="seconds"), "commit": git_commit(),
                  "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"}
        (cfg.parent / "trial.json").write_text(json.dumps(record, indent=2))
        print(f"{name}: rc {rc}, {record['wall_s']} s", flush=True)
    return 0


def _monitor(metrics: Path) -> list[tuple[int, float]]:
    with open(metrics) as f:
        return [(int(r["step"]), float(r["knn_k20"])) for r in csv.DictReader(f) if r.get("knn_k20")]


def _at(curve: list[tuple[int, float]], step: int) -> float | None:
    before = [v for s, v in curve if s <= step]
    return before[-1] if before else None


def _ran(folder: Path) -> str:
    """When the trial's jobs ran (UTC), from its Snakemake benchmark files: each written at its job's end, with
    the job's wall seconds in column ``s``. Not from the record, which a later ``run`` finding the trial done
    rewrites."""
    spans = []
    for tsv in (folder / "benchmarks").rglob("*.tsv"):
        with open(tsv) as f:
            wall = float(next(csv.DictReader(f, delimiter="\t"))["s"])
        end = tsv.stat().st_mtime
        spans.append((end - wall, end))
    if not spans:
        return ""
    fmt = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M")  # noqa: E731
    start, end = min(a for a, _ in spans), max(b for _, b in spans)
    return f"{datetime.fromtimestamp(start, timezone.utc):%Y-%m-%d} {fmt(start)}-{fmt(end)}"


def collect(root: Path) -> list[dict]:
    rows = []
    for trial in sorted(root.glob("*/trial.json")):
        record = json.loads(trial.read_text())
        probes = trial.parent / "fmnist" / "trial" / "probes.json"
        if record["rc"] != 0 or not probes.exists():
            continue
        p = json.loads(probes.read_text())
        curve = _monitor(Path(p["backbone"]).parent / "metrics.csv")
        rows.append({**record, "top1": {h: p["top1"][h] for h in HEADS}, "knn": p["knn"]["top1"],
                     "pretrain_wall_s": p["pretrain_wall_s"], "probe_wall_s": p["probe_wall_s"],
                     "precision": p["pretrain_precision"], "monitor": curve, "ran": _ran(trial.parent),
                     # the stages' own commits (the record's is that of the last `run`)
                     "commit": "/".join(dict.fromkeys([p["pretrain_commit"], p["probe_commit"]]))})
    return rows


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def report(root: Path) -> int:
    rows = collect(root)
    if not rows:
        sys.exit(f"error: no finished trial under {root}: run `... default_recipe run NAME` first")
    order = {n: i for i, n in enumerate(TRIALS)}
    rows.sort(key=lambda r: order.get(r["trial"], len(order)))
    base = next((r for r in rows if r["trial"] == "random_init"), None)
    lines = ["# Default-recipe study: trials (generated by `benchmarks/studies/default_recipe.py report`)", "",
             "Linear-probe top-1 (%) on the val split, fast protocol, seed 0; kNN: the table's k = 20 kNN;",
             "monitor: the online kNN (k = 20, 2,000-image bank) at steps 250 / 500 / the last (936).",
             "Bold: at or above random init.", "",
             "| trial | overrides | F1 | F2 | F3 | F4 | F5 | AvgPool | kNN | mon@250 | mon@500 | mon@end "
             "| pretrain s | commit (pretrain/probe) | jobs ran (UTC) |",
             "|---|---|" + "---|" * 13]
    for r in rows:
        cells = []
        for h in HEADS:
            v = r["top1"][h]
            above = base is not None and r is not base and v >= base["top1"][h]
            cells.append(f"**{v:.2f}**" if above else f"{v:.2f}")
        knn_above = base is not None and r is not base and r["knn"] >= base["knn"]
        cells.append(f"**{r['knn']:.2f}**" if knn_above else f"{r['knn']:.2f}")
        mon = [_fmt(_at(r["monitor"], s)) for s in (250, 500, 10**9)]
        lines.append(f"| {r['trial']} | `{json.dumps(r['overrides'])}` | " + " | ".join(cells + mon) +
                     f" | {r['pretrain_wall_s']:.0f} | {r['commit']} | {r['ran']} |")
    machines = sorted({r["machine"] for r in rows})
    lines += ["", f"Machine: {'; '.join(machines)}. Precision: {', '.join(sorted({r['precision'] for r in rows if r['precision']}))}.",
              f"Trials' results folders: `{root}` (not committed); their settings: `TRIALS` in the script.", ""]
    (HERE / "default_recipe.md").write_text("\n".join(lines))
    (HERE / "default_recipe.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, base, HERE / "default_recipe.png")
    print("\n".join(lines))
    return 0


def _plot(rows: list[dict], base: dict | None, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for r in rows:
        if r["monitor"] and r is not base:
            s, v = zip(*r["monitor"])
            ax1.plot(s, v, marker=".", label=r["trial"])
    if base is not None and base["monitor"]:
        ax1.axhline(base["monitor"][-1][1], color="k", ls="--", label="random init")
    ax1.set(xlabel="pretraining step", ylabel="online kNN top-1 (%)", title="Monitor during pretraining")
    ax1.legend(fontsize=7)
    names = [r["trial"] for r in rows]
    x = range(len(rows))
    for i, h in enumerate(("feature5", "avgpool")):
        ax2.scatter([j + (i - 0.5) * 0.2 for j in x], [r["top1"][h] for r in rows], label=h, marker="os"[i])
        if base is not None:
            ax2.axhline(base["top1"][h], color=f"C{i}", ls="--", lw=0.8, label=f"random init {h}")
    ax2.set_xticks(list(x), names, rotation=45, ha="right", fontsize=7)
    ax2.set(ylabel="linear-probe top-1 (%)", title="Feature5 and AvgPool after 2 epochs")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"trials' results folders (default {DEFAULT_ROOT})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run trials one after another")
    r.add_argument("names", nargs="+", help=f"trial names: {', '.join(TRIALS)}")
    r.add_argument("--data", type=Path, default=REPO / "results" / "data" / "fmnist",
                   help="converted Fashion-MNIST .beton files to hard-link in (default: the default run's)")
    sub.add_parser("report", help="table, JSON and plot from the finished trials")
    args = ap.parse_args(argv)
    return run(args.names, args.root, args.data) if args.cmd == "run" else report(args.root)


if __name__ == "__main__":
    raise SystemExit(main())
