"""Aggregate probe results into the benchmark table, a CSV with provenance, and plots.

Reads only result files (``probes.json`` and the ``metrics.csv`` of each run's pretraining); never
imports training code. Each row's identity (dataset, experiment, seed) comes with it from the workflow
or from inside the file, never from its path. An experiment run with several seeds is one row of
``mean ± std (n)`` (sample std) in the table; the CSV keeps one row per seed plus an aggregate row
(``seed`` = ``mean``, ``<column>_std``, ``n_seeds``).
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pandas as pd

from barlow import layout, published, report_finetune
from barlow.atomic import atomic_path, write_text
from barlow.errors import BadInput

PROBE_COLUMNS = ["Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool"]
COLUMNS = [*PROBE_COLUMNS, "kNN"]
STD_COLUMNS = [f"{c}_std" for c in COLUMNS]
HEAD_TO_COLUMN = {"feature1": "Feature1", "feature2": "Feature2", "feature3": "Feature3", "feature4": "Feature4",
                  "feature5": "Feature5", "avgpool": "AvgPool"}
MONITOR = ["knn_k20", "knn_k200", "linear_top1"]  # metrics.csv columns, filled on evaluation rows only


def _entry(run: dict | str | Path) -> tuple[Path, dict]:
    """(probes.json, its identity): the workflow passes identity with each file (``--runs-json``); a file
    given alone carries it (``identity``, written by the probe stage; the metrics path relative to it)."""
    if isinstance(run, dict):
        return Path(run["probes"]), run
    path = Path(run)
    try:
        ident = json.loads(path.read_text()).get("identity")
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: unreadable probe result ({type(e).__name__}); rerun its probe stage") from None
    if not ident or "experiment" not in ident:
        raise BadInput(f"{path}: no identity (dataset, experiment, seed) inside; it predates them: let the workflow "
                       "report it (snakemake), or rerun its merge (snakemake --forcerun merge_probes)")
    return path, {**ident, "metrics": str(path.parent / ident.get("metrics", "metrics.csv"))}


def load_rows(runs: list[dict | str | Path]) -> pd.DataFrame:
    rows = []
    for run in runs:
        path, ident = _entry(run)
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: unreadable probe result ({type(e).__name__}); rerun its probe stage") from None
        cfg = r.get("config", {})
        dataset, exp, seed = ident["dataset"], ident["experiment"], ident.get("seed")
        knn = r.get("knn") or {}
        row = {"dataset": dataset, "config": exp,
               **{HEAD_TO_COLUMN[k]: v for k, v in r["top1"].items()}, "kNN": knn.get("top1"),
               "protocol": r.get("protocol"), "init": r.get("init"), "arch": cfg.get("model", {}).get("arch"),
               "pretrain_epochs": r.get("pretrain_epochs"), "pretrain_steps": r.get("pretrain_steps"),
               "seed": cfg.get("pretrain", {}).get("seed") if seed is None else seed, "probe_seed": r.get("seed"),
               "commit": r.get("pretrain_commit"), "pretrain_wall_s": r.get("pretrain_wall_s"),
               "pretrain_precision": r.get("pretrain_precision"),
               "probe_wall_s": r.get("probe_wall_s"), "train_images": r.get("train_images"),
               "val_images": r.get("val_images"), "backbone_file": r.get("backbone"),
               "backbone_format": r.get("backbone_format"), "backbone_sha256": r.get("backbone_sha256"),
               "kNN_k200": knn.get("top1_k200"), "run": f"{dataset}/{layout.run_key(exp, seed)}",
               "metrics": str(ident.get("metrics") or ""), "preset": ident.get("preset"),
               # the workflow says so (the stages get no description); a hand-run smoke config's says "SMOKE"
               "smoke": bool(ident.get("smoke")) or str(cfg.get("description", "")).startswith("SMOKE")}
        rows.append(row)
    df = pd.DataFrame(rows)
    for c in COLUMNS + ["kNN_k200"]:
        df[c] = pd.to_numeric(df[c]).astype(float) if c in df else float("nan")
    return df[["dataset", "config", *COLUMNS, *[c for c in df if c not in COLUMNS + ["dataset", "config"]]]]


def _experiments(df: pd.DataFrame):
    """(dataset, experiment) -> its rows (one per seed), in the order of the results."""
    return df.groupby(["dataset", "config"], sort=False)


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
    epochs = f"{r['pretrain_epochs']:g} pretraining epoch{'' if r['pretrain_epochs'] == 1 else 's'}"  # (a float beside NaN)
    if r.get("smoke"):
        epochs = f"SMOKE run ({r['pretrain_steps']:.0f} pretraining steps: checks the code path, not a result)"
    if r["init"] != "random" and not pd.isna(r.get("pretrain_precision")):
        epochs += f" ({r['pretrain_precision']})"
    return (f"{r['config']}: {r['arch']}, {epochs}, probe protocol `{r['protocol']}`, "
            f"{r['train_images']} train / {r['val_images']} val images")


def _crossing_note(g: pd.DataFrame) -> str:
    """Where the online kNN of each seed of a pretrained experiment reaches random init's ("" if unknown)."""
    parts = []
    for _, r in g.iterrows():
        if pd.isna(r.get("monitor_random_knn")) or pd.isna(r.get("monitor_last_step")):
            continue
        if pd.isna(r.get("monitor_cross_step")):
            text = (f"stays below random init ({r['monitor_random_knn']:.2f}) through step "
                    f"{int(r['monitor_last_step'])}")
        else:
            text = f"crosses random init at step {int(r['monitor_cross_step'])} (epoch {r['monitor_cross_epoch']:.2f})"
        parts.append(text + (f" [seed {r['seed']}]" if len(g) > 1 else ""))
    return f"; online kNN {', '.join(parts)}" if parts else ""


def _cell(values: pd.Series, single: bool) -> str:
    v = values.dropna()
    if v.empty:
        return ""
    if single:
        return f"{v.iloc[0]:.2f}"
    if len(v) == 1:
        return f"{v.iloc[0]:.2f} (1)"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f} ({len(v)})"


def markdown(df: pd.DataFrame, reference: pd.DataFrame | None = None) -> str:
    parts = []
    for dataset, sub in df.groupby("dataset", sort=False):
        cols = COLUMNS + report_finetune.table_columns(sub)  # FT columns only where some row has them
        parts.append(f"### {dataset}\n")
        parts.append("| config | " + " | ".join(map(report_finetune.label, cols)) + " |")
        parts.append("|---|" + "---|" * len(cols))
        notes, published_notes = set(), {}
        for _, g in _experiments(sub):
            r = g.iloc[0]
            cells = [_cell(g[c], len(g) == 1) for c in cols]
            parts.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
            parts += published.markdown_rows(g, cols)  # Published (<source>) and Δ, where the preset has them
            seeds = f", seeds {', '.join(str(s) for s in g['seed'])}" if len(g) > 1 else ""
            notes.add(_note(r) + seeds + _crossing_note(g))
            notes.add(report_finetune.note(g))
            published_notes[published.note(g)] = None  # after the experiments' notes, in table order
        parts.append("")
        parts += [f"- {n}" for n in [*sorted(notes), *published_notes] if n]
        parts += [f"- {n}" for n in reference_notes(reference, dataset) + report_finetune.notes(sub)]
        parts.append("")
    return "\n".join(parts)


def reference_notes(reference: pd.DataFrame | None, dataset: str) -> list[str]:
    """Where a committed reference run of ``dataset`` crossed random init: the yardstick of a short run."""
    if reference is None or reference.empty:
        return []
    notes = []
    for _, r in reference[(reference["dataset"] == dataset) & reference["init"].map(_is_pretrained)].iterrows():
        crossing = _crossing_note(pd.DataFrame([r]))
        if crossing:
            notes.append(f"reference (not a row of this table) {r['source']}: {r['pretrain_epochs']} pretraining "
                         f"epochs{crossing}")
    return notes


def aggregate(df: pd.DataFrame, columns: list[str] = COLUMNS) -> pd.DataFrame:
    """One row per result file, each multi-seed experiment followed by its aggregate row."""
    out = []
    for (dataset, config), g in _experiments(df):
        out.append(g)
        if len(g) < 2:
            continue
        shared = {c: g[c].iloc[0] for c in g.columns if g[c].astype(str).nunique() == 1}  # what the seeds agree on
        agg = {**shared, "dataset": dataset, "config": config, "seed": "mean", "n_seeds": len(g)}
        for c in columns:
            agg[c], agg[f"{c}_std"] = g[c].mean(), g[c].std(ddof=1)
        out.append(pd.DataFrame([agg]))
    table = pd.concat(out, ignore_index=True)
    for c in df.columns.drop("seed"):  # whole numbers stay whole where the aggregate rows leave a gap
        if pd.api.types.is_integer_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]):
            table[c] = table[c].astype("Int64" if pd.api.types.is_integer_dtype(df[c]) else "boolean")
    for c in ["n_seeds", *STD_COLUMNS]:
        if c not in table:
            table[c] = float("nan")
    table["n_seeds"] = table["n_seeds"].astype("Int64")
    first = ["dataset", "config", *COLUMNS, "seed", "n_seeds", *STD_COLUMNS]
    return table[first + [c for c in table if c not in first]]


def monitor_values(path) -> pd.DataFrame | None:
    """The evaluated rows of a run's metrics.csv (step, epoch, knn_k20, ...), sorted by step; None
    without any (no file, an empty one, or one written before the monitor existed)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        m = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    if "knn_k20" not in m:
        return None
    m = m[m["knn_k20"].notna()].sort_values("step", kind="stable")
    return None if m.empty else m


def _pretrained(r: pd.Series) -> bool:
    return _is_pretrained(r["init"])


def _is_pretrained(init) -> bool:
    return init not in ("random", "checkpoint")


def random_init_knn(df: pd.DataFrame) -> dict[tuple, float]:
    """(dataset, arch) -> the online kNN k=20 of its random-init runs (their mean over seeds)."""
    values: dict[tuple, list[float]] = {}
    for _, r in df[df["init"] == "random"].iterrows():
        m = monitor_values(r["metrics"])
        if m is not None:
            values.setdefault((r["dataset"], r["arch"]), []).append(float(m["knn_k20"].iloc[0]))
    return {k: sum(v) / len(v) for k, v in values.items()}


def first_crossing(m: pd.DataFrame, ref: float) -> pd.Series | None:
    """The first evaluation after step 0 whose kNN k=20 is >= ``ref``. Step 0 is excluded: before
    any update, a pretraining run with random init's seed has random init's very weights."""
    hit = m[(m["step"] > 0) & (m["knn_k20"] >= ref)]
    return None if hit.empty else hit.iloc[0]


def monitor_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per row: random init's online kNN, where the run's online kNN first reaches it, its last evaluated step."""
    refs = random_init_knn(df)
    cols = ["monitor_random_knn", "monitor_cross_step", "monitor_cross_epoch", "monitor_last_step"]
    out = pd.DataFrame(index=df.index, columns=cols, dtype=float)
    for i, r in df.iterrows():
        ref = refs.get((r["dataset"], r["arch"]))
        m = monitor_values(r["metrics"]) if _pretrained(r) else None
        if m is None or ref is None:
            continue
        hit = first_crossing(m, ref)
        out.loc[i, cols] = [ref, *((hit["step"], hit["epoch"]) if hit is not None else (None, None)), m["step"].max()]
    return out


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
        # monitor-only rows (the step-0 evaluation) have no loss or lr
        loss, lr = m.dropna(subset=["loss"]), m.dropna(subset=["lr"])
        if loss.empty:
            continue
        label = r["run"]
        ax_loss.plot(loss["step"], loss["loss"].rolling(max(1, len(loss) // 50), min_periods=1).mean(), label=label)
        ax_lr.plot(lr["step"], lr["lr"], label=label)
    ax_loss.set(title="Barlow Twins loss (running mean)", xlabel="optimizer step", ylabel="loss", yscale="log")
    ax_lr.set(title="learning rate", xlabel="optimizer step", ylabel="lr")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def plot_top1(df: pd.DataFrame, out: Path) -> None:
    """Linear-probe top-1 per feature level; a multi-seed experiment as its mean with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (dataset, config), g in _experiments(df):
        style = {"random": "--", "checkpoint": ":"}.get(g["init"].iloc[0], "-")
        if len(g) == 1:
            ax.plot(PROBE_COLUMNS, [g[c].iloc[0] for c in PROBE_COLUMNS], style, marker="o", label=f"{dataset}/{config}")
        else:
            ax.errorbar(PROBE_COLUMNS, [g[c].mean() for c in PROBE_COLUMNS], yerr=[g[c].std(ddof=1) for c in PROBE_COLUMNS],
                        fmt=style, marker="o", capsize=3, label=f"{dataset}/{config} (mean ± std, {len(g)} seeds)")
    ax.set(title="Linear-probe top-1 by feature level", ylabel="top-1 (%)", xlabel="feature")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def plot_monitor(df: pd.DataFrame, out: Path, reference: pd.DataFrame | None = None) -> None:
    """Pretraining's online monitor: kNN k=20 (solid) and online linear (dashed) top-1 by step, one
    panel per dataset, random init's kNN as a horizontal line and where each run first reaches it;
    a reference run's kNN (e.g. the committed long run) in grey beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = random_init_knn(df)
    # a table without its own random-init row measures its runs against the reference's
    borrowed = {} if reference is None else {k: v for k, v in random_init_knn(reference).items()
                                             if not any(d == k[0] for d, _ in refs)}
    runs = [(r, m) for _, r in df.iterrows() if _pretrained(r) and (m := monitor_values(r["metrics"])) is not None]
    others = [] if reference is None else [(r, m) for _, r in reference.iterrows()
                                           if _pretrained(r) and (m := monitor_values(r["metrics"])) is not None]
    datasets = list(dict.fromkeys([r["dataset"] for r, _ in runs] + [d for d, _ in refs] + [d for d, _ in borrowed]))
    if not datasets:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "No online monitor values: no metrics.csv of these runs has knn_k20\n"
                "(pretrained before the monitor existed, or with pretrain.monitor disabled)",
                ha="center", va="center", fontsize=11)
        _save(fig, out)
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(7.5 * len(datasets), 6.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        own = {arch: v for (d, arch), v in refs.items() if d == dataset}
        _monitor_panel(ax, dataset, [(r, m) for r, m in runs if r["dataset"] == dataset],
                       own or {arch: v for (d, arch), v in borrowed.items() if d == dataset}, borrowed=not own)
        for r, m in (x for x in others if x[0]["dataset"] == dataset):
            _reference_curve(ax, r, m)
    fig.tight_layout()
    _save(fig, out)


def _monitor_panel(ax, dataset: str, runs: list, refs: dict, borrowed: bool = False) -> None:
    for arch, ref in refs.items():
        ax.axhline(ref, color="gray", ls=":", lw=1.5, label="random init kNN" + (f" ({arch})" if len(refs) > 1 else "")
                   + (" (the reference's row)" if borrowed else ""))
    for r, m in runs:
        knn, = ax.plot(m["step"], m["knn_k20"], "-", marker=".", label=f"{r['run']} kNN k=20")
        lin = m.dropna(subset=["linear_top1"])
        ax.plot(lin["step"], lin["linear_top1"], "--", marker="x", color=knn.get_color(), label=f"{r['run']} online linear")
        ref = refs.get(r["arch"])
        if ref is None:
            continue
        hit = first_crossing(m, ref)
        if hit is None:
            knn.set_label(f"{knn.get_label()} (does not cross random init)")
            continue
        ax.plot([hit["step"]], [hit["knn_k20"]], ls="none", marker="*", ms=14, color=knn.get_color(),
                label=f"_crossing {r['run']}")
        ax.annotate(f"crosses at step {int(hit['step'])}", (hit["step"], hit["knn_k20"]), xytext=(6, -14),
                    textcoords="offset points", fontsize=8, color=knn.get_color())
    ax.set(title=f"{dataset}: online monitor during pretraining", xlabel="optimizer step",
           ylabel="monitor top-1 (%)")
    ax.set_xlim(left=0)  # the untrained start, where the random-init line is measured
    _epoch_axis(ax, [m for _, m in runs])
    ax.grid(alpha=0.3)
    _below_legend(ax)


def _below_legend(ax) -> None:
    """Under the panel: inside it, the legend covered the early, low part of the curves."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)


def _reference_curve(ax, r: pd.Series, m: pd.DataFrame) -> None:
    ax.plot(m["step"], m["knn_k20"], "-", color="0.55", lw=1, label=f"reference {r['source']} kNN k=20")
    if not pd.isna(r.get("monitor_cross_step")):
        at = (r["monitor_cross_step"], m.set_index("step").loc[r["monitor_cross_step"], "knn_k20"])
        ax.plot(*([v] for v in at), ls="none", marker="*", ms=11, color="0.55", label="_reference crossing")
        ax.annotate(f"reference crosses at step {int(at[0])}", at, xytext=(6, 6), textcoords="offset points",
                    fontsize=8, color="0.4")
        # a short run's panel is widened to show where the reference crossed, not to its whole length
        ax.set_xlim(0, max(ax.get_xlim()[1], at[0] * 1.15))
    _below_legend(ax)


def _epoch_axis(ax, monitors: list[pd.DataFrame]) -> None:
    """Epochs on a top axis when every run of the panel has the same steps per epoch."""
    ratios = [float(m["epoch"].iloc[-1]) / float(m["step"].iloc[-1]) for m in monitors
              if "epoch" in m and m["step"].iloc[-1] > 0 and pd.notna(m["epoch"].iloc[-1])]
    if not ratios or max(ratios) - min(ratios) > 0.01 * max(ratios) or max(ratios) <= 0:
        return
    ratio = sum(ratios) / len(ratios)
    ax.secondary_xaxis("top", functions=(lambda s: s * ratio, lambda e: e / ratio)).set_xlabel("epoch")


def html_table(csv: Path) -> str:
    """benchmark.csv cell for cell as an HTML page: Snakemake's report shows HTML inline, a CSV only
    as a download."""
    t = pd.read_csv(csv, dtype=str, keep_default_na=False).to_html(index=False)
    return ("<!DOCTYPE html><meta charset=utf-8><style>body{font:13px sans-serif} table{border-collapse:collapse} "
            f"th,td{{padding:2px 8px;white-space:nowrap}}</style>{t}")


def _save(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def load_reference(paths: list[str | Path] | None) -> pd.DataFrame | None:
    """Committed reference runs (their probes.json and the metrics.csv beside it), with their own
    random-init row's crossing: drawn and noted beside this table, never rows of it."""
    if not paths:
        return None
    ref = load_rows(paths)
    ref["source"] = [f"`{_entry(p)[0].parent}`" for p in paths]
    return ref.join(monitor_summary(ref))


def report(runs: list[dict | str | Path], out_dir: str | Path = "results", provenance: dict | None = None,
           reference: list[str | Path] | None = None) -> pd.DataFrame:
    if not runs:
        raise BadInput("report: no probe results given; list experiments in config.yaml")
    out_dir = Path(out_dir)
    df = load_rows(runs)
    df = df.join(monitor_summary(df)).join(report_finetune.load(runs, [_entry(r)[0] for r in runs], df.index))
    ref = load_reference(reference)
    prov = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": f"{platform.node()} {platform.machine()} "
            f"{platform.processor() or ''}".strip(), **(provenance or {})}
    table = published.annotate(aggregate(df.drop(columns=["metrics"]), COLUMNS + report_finetune.table_columns(df)),
                               COLUMNS).assign(**prov)
    with atomic_path(out_dir / "benchmark.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.2f")
    write_text(out_dir / "benchmark.html", html_table(out_dir / "benchmark.csv"))
    header = ("# Barlow Twins benchmark: linear-probe top-1 (%) on the val split\n\n"
              f"Generated {prov['generated_at']} on `{prov['machine']}`"
              + "".join(f", {k} `{v}`" for k, v in (provenance or {}).items())
              + ". Provenance per row (commit, seed, wall time): benchmark.csv.\n\n"
              "kNN: weighted k-nearest-neighbour top-1 (k = 20, cosine, exp(sim / 0.07) votes) of the val "
              "AvgPool features against the train set's. An experiment run with several seeds shows "
              "mean ± sample std (number of seeds). Each probe reports the top-1 of its heads after the final "
              "epoch (val is evaluated once, at the end), not the best epoch on val as the official evaluate.py "
              "and lightly do. Published rows and Δ (regenerated − published): barlow/published.yaml.\n\n")
    write_text(out_dir / "benchmark.md", header + markdown(df, ref))
    plot_curves(df, out_dir / "plots" / "pretrain_curves.png")
    plot_top1(df, out_dir / "plots" / "top1_by_feature.png")
    plot_monitor(df, out_dir / "plots" / "monitor_curves.png", ref)
    print(markdown(df, ref))
    return table
