"""The fine-tune columns of the benchmark table (barlow/finetune.py's results), torch-free.

Per row (one run), for each percent ``p`` it was fine-tuned at: ``ft<p>_top1`` / ``ft<p>_top5``, the val top-1 /
top-5 after the FINAL epoch (the table's ``FT<p>% top-1`` / ``FT<p>% top-5``); in the CSV beside them
``ft<p>_best_on_val_top1`` / ``_top5`` (the maxima over the epochs, each on its own: what the official evaluate.py
reports, a figure selected on val, never the table's), ``ft<p>_method`` (simclr: SimCLR's ImageNet lists;
balanced: a seeded class-balanced subset), ``ft<p>_subset_sha256``, ``ft<p>_train_images``, ``ft<p>_epochs``,
``ft<p>_wall_s`` and ``ft<p>_commit`` (the fine-tune's own code, which may be later than the pretraining's).

Which files belong to a row comes with it: the workflow lists them (``finetune`` in ``--runs-json``); a
probes.json given alone takes the ``finetune/<p>pc.json`` beside it (barlow.layout).
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pandas as pd

from barlow import layout
from barlow.errors import BadInput

METRICS = ("top1", "top5")
EXTRAS = ("best_on_val_top1", "best_on_val_top5", "method", "subset_sha256", "train_images", "epochs", "wall_s",
          "commit")


def files_of(run: dict | str | Path, probes: Path) -> list[str]:
    """The fine-tune results of one report entry (``probes``: its probes.json)."""
    if isinstance(run, dict) and "probes" in run:
        return list(run.get("finetune") or [])
    # a probes.json given alone: its run folder's finetune/ (barlow.layout.finetune_file)
    return sorted(glob.glob(layout.finetune_in(str(probes.parent), "*")))


def _read(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: unreadable fine-tune result ({type(e).__name__}); rerun its finetune stage") from None


def row(paths: list[str]) -> dict:
    """One run's fine-tune columns."""
    out = {}
    for path in paths:
        r = _read(path)
        tag = f"ft{layout.percent_tag(r['percent'])}"
        best = r.get("best_on_val") or {}
        out.update({f"{tag}_top1": r["top1"], f"{tag}_top5": r["top5"],
                    f"{tag}_best_on_val_top1": best.get("top1"), f"{tag}_best_on_val_top5": best.get("top5"),
                    f"{tag}_method": r.get("method"), f"{tag}_subset_sha256": r.get("subset_sha256"),
                    f"{tag}_train_images": r.get("train_images"), f"{tag}_epochs": r.get("epochs"),
                    f"{tag}_wall_s": r.get("finetune_wall_s"), f"{tag}_commit": r.get("finetune_commit")})
    return out


def load(runs: list, probes: list[Path], index) -> pd.DataFrame:
    """The fine-tune columns of every entry of ``runs`` (their probes.json ``probes``), on ``index``."""
    rows = [row(files_of(run, p)) for run, p in zip(runs, probes)]
    return pd.DataFrame(rows, index=index)


def _percent(column: str) -> float:
    return float(column[2:].split("_", 1)[0])


def table_columns(df: pd.DataFrame) -> list[str]:
    """The table's fine-tune columns present in ``df`` (some row has a value), by percent: [] without any."""
    cols = [c for c in df.columns if c.startswith("ft") and c.endswith(("_top1", "_top5"))
            and "_best_on_val_" not in c and df[c].notna().any()]
    return sorted(cols, key=lambda c: (_percent(c), c))


def label(column: str) -> str:
    """The table's header of a column: ``ft1_top1`` -> ``FT1% top-1``; any other as it is."""
    if not (column.startswith("ft") and column.endswith(("_top1", "_top5"))):
        return column
    tag, metric = column[2:].rsplit("_", 1)
    return f"FT{tag}% top-{metric[-1]}"


def note(g: pd.DataFrame) -> str:
    """An experiment's fine-tune note (its rows ``g``): subsets and epochs, and evaluate.py's figure beside ours."""
    parts = []
    for c in (c for c in table_columns(g) if c.endswith("_top1")):
        tag = c[: -len("_top1")]
        r = g.iloc[0]
        best = "/".join(_fmt(g[f"{tag}_best_on_val_{m}"]) for m in METRICS)
        parts.append(f"{label(c)[:-len(' top-1')]}: {_int(r[f'{tag}_train_images'])} train images ({r[f'{tag}_method']} "
                     f"subset), final epoch of {_int(r[f'{tag}_epochs'])} (best epoch on val: {best})")
    return f"{g.iloc[0]['config']} fine-tune: " + "; ".join(parts) if parts else ""


def _fmt(v: pd.Series) -> str:
    v = v.dropna()
    return f"{v.mean():.2f}" if len(v) else "-"


def _int(v) -> str:
    return "?" if v is None or pd.isna(v) else f"{int(v):,}"


def notes(df: pd.DataFrame) -> list[str]:
    """The table's one note on the fine-tune columns, where it has any."""
    if not table_columns(df):
        return []
    return ["FT<p>% top-1 / top-5: the backbone and a linear head fine-tuned end to end on p % of the train labels "
            "(barlow/finetune.py: the Barlow Twins paper's evaluate.py recipe), val top-1 / top-5 after the FINAL "
            "epoch; the official evaluate.py reports the best epoch on val instead (in brackets in the notes, and "
            "benchmark.csv's ft<p>_best_on_val_top1 / _top5: selected on val, so not comparable as a result)"]
