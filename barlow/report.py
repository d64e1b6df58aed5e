"""Aggregate probe results into the benchmark table, a CSV with provenance, and plots.

Reads only result files (``probes.json`` and the ``metrics.csv`` beside each run's backbone);
never imports training code. Rows are ``results/<dataset>/<experiment>/probes.json``.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pandas as pd

from barlow.atomic import atomic_path, write_text
from barlow.errors import BadInput

COLUMNS = ["Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool"]
HEAD_TO_COLUMN = {"feature1": "Feature1", "feature2": "Feature2", "feature3": "Feature3", "feature4": "Feature4",
                  "feature5": "Feature5", "avgpool": "AvgPool"}


def load_rows(runs: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in map(Path, runs):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: unreadable probe result ({type(e).__name__}); rerun its probe stage") from None
        cfg = r.get("config", {})
        row = {"dataset": path.parent.parent.name, "config": path.parent.name,
               **{HEAD_TO_COLUMN[k]: v for k, v in r["top1"].items()},
               "protocol": r.get("protocol"), "init": r.get("init"), "arch": cfg.get("model", {}).get("arch"),
               "pretrain_epochs": r.get("pretrain_epochs"), "pretrain_steps": r.get("pretrain_steps"),
               "seed": cfg.get("pretrain", {}).get("seed"), "probe_seed": r.get("seed"),
               "commit": r.get("pretrain_commit"), "pretrain_wall_s": r.get("pretrain_wall_s"),
               "pretrain_precision": r.get("pretrain_precision"),
               "probe_wall_s": r.get("probe_wall_s"), "train_images": r.get("train_images"),
               "val_images": r.get("val_images"), "backbone_file": r.get("backbone"),
               "backbone_format": r.get("backbone_format"), "backbone_sha256": r.get("backbone_sha256"),
               "metrics": str(path.parent / "metrics.csv"),
               "smoke": str(cfg.get("description", "")).startswith("SMOKE")}
        rows.append(row)
    df = pd.DataFrame(rows)
    return df[["dataset", "config", *[c for c in COLUMNS if c in df], *[c for c in df if c not in COLUMNS + ["dataset", "config"]]]]


def _label(r: pd.Series) -> str:
    if r["init"] == "random":
        return f"Random init ({r['config']})"
    if r["init"] == "checkpoint":
        return f"Released: {r['config']}"
    return r["config"]


def _note(r: pd.Series) -> str:
    if r["init"] == "checkpoint":
        name = Path(str(r.get("backbone_file"))).name
        smoke = "SMOKE run (checks the code path, not a result): " if r.get("smoke") else ""
        return (f"{r['config']}: {r['arch']}, {smoke}released weights `{name}` (format {r.get('backbone_format')}, "
                f"sha256 {r.get('backbone_sha256')}), no pretraining here, probe protocol `{r['protocol']}`, "
                f"{r['train_images']} train / {r['val_images']} val images")
    epochs = f"{r['pretrain_epochs']} pretraining epoch{'' if r['pretrain_epochs'] == 1 else 's'}"
    if r.get("smoke"):
        epochs = f"SMOKE run ({r['pretrain_steps']} pretraining steps: checks the code path, not a result)"
    if r["init"] != "random" and not pd.isna(r.get("pretrain_precision")):
        epochs += f" ({r['pretrain_precision']})"
    return (f"{r['config']}: {r['arch']}, {epochs}, probe protocol `{r['protocol']}`, "
            f"{r['train_images']} train / {r['val_images']} val images")


def markdown(df: pd.DataFrame) -> str:
    parts = []
    for dataset, sub in df.groupby("dataset", sort=False):
        parts.append(f"### {dataset}\n")
        parts.append("| config | " + " | ".join(COLUMNS) + " |")
        parts.append("|---|" + "---|" * len(COLUMNS))
        for _, r in sub.iterrows():
            label = _label(r)
            cells = ["" if pd.isna(r.get(c)) else f"{r[c]:.2f}" for c in COLUMNS]
            parts.append(f"| {label} | " + " | ".join(cells) + " |")
        notes = sorted({_note(r) for _, r in sub.iterrows()})
        parts.append("")
        parts += [f"- {n}" for n in notes]
        parts.append("")
    return "\n".join(parts)


def plot_curves(df: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for _, r in df.iterrows():
        path = Path(r["metrics"])
        if r["init"] in ("random", "checkpoint") or not path.is_file():
            continue
        m = pd.read_csv(path)
        if m.empty:
            continue
        label = f"{r['dataset']}/{r['config']}"
        ax_loss.plot(m["step"], m["loss"].rolling(max(1, len(m) // 50), min_periods=1).mean(), label=label)
        ax_lr.plot(m["step"], m["lr"], label=label)
    ax_loss.set(title="Barlow Twins loss (running mean)", xlabel="optimizer step", ylabel="loss", yscale="log")
    ax_lr.set(title="learning rate", xlabel="optimizer step", ylabel="lr")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def plot_top1(df: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for _, r in df.iterrows():
        ys = [r.get(c) for c in COLUMNS]
        style = {"random": "--", "checkpoint": ":"}.get(r["init"], "-")
        ax.plot(COLUMNS, ys, style, marker="o", label=f"{r['dataset']}/{r['config']}")
    ax.set(title="Linear-probe top-1 by feature level", ylabel="top-1 (%)", xlabel="feature")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def _save(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def report(runs: list[str | Path], out_dir: str | Path = "results", provenance: dict | None = None) -> pd.DataFrame:
    if not runs:
        raise BadInput("report: no probe results given; list experiments in config.yaml")
    out_dir = Path(out_dir)
    df = load_rows(runs)
    prov = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": f"{platform.node()} {platform.machine()} "
            f"{platform.processor() or ''}".strip(), **(provenance or {})}
    table = df.drop(columns=["metrics"]).assign(**prov)
    with atomic_path(out_dir / "benchmark.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.2f")
    header = ("# Barlow Twins benchmark: linear-probe top-1 (%) on the val split\n\n"
              f"Generated {prov['generated_at']} on `{prov['machine']}`"
              + "".join(f", {k} `{v}`" for k, v in (provenance or {}).items())
              + ". Provenance per row (commit, seed, wall time): benchmark.csv.\n\n")
    write_text(out_dir / "benchmark.md", header + markdown(df))
    plot_curves(df, out_dir / "plots" / "pretrain_curves.png")
    plot_top1(df, out_dir / "plots" / "top1_by_feature.png")
    print(markdown(df))
    return table
