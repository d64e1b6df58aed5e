"""The published numbers a regenerated row is compared with (``barlow/published.yaml``), torch-free.

Per preset: the upstream row (its cells as the upstream file writes them, with repository, path and
commit) and how the preset relates to it (``reproduces`` the published recipe and probe protocol, or
``reference``: printed for comparison, ``differs`` says how), or none. The report prints it under the
experiment's row with the difference per cell, Δ = regenerated − published (the mean over seeds), and,
when the experiment has several seeds, whether the gap is within seed noise: |Δ| ≤ 2 · sample std.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pandas as pd
import yaml

FILE = Path(__file__).resolve().parent / "published.yaml"
NOISE_SIGMAS = 2


@functools.cache
def _data() -> dict:
    from barlow.config import SAFE_LOADER

    return yaml.load(FILE.read_text(), Loader=SAFE_LOADER)


def presets() -> dict[str, dict | None]:
    """Every preset the data file lists -> its entry (None: no published numbers)."""
    return dict(_data()["presets"])


def for_preset(preset) -> dict | None:
    """The published row of ``preset``: {name, repository, path, commit, model, top1 (column -> text),
    relation, differs}; None when it has none (or is not a preset the data file knows)."""
    entry = presets().get(preset) if isinstance(preset, str) else None
    if not entry:
        return None
    return {**_data()["sources"][entry["source"]], "relation": entry["relation"], "differs": entry.get("differs")}


def source_text(pub: dict) -> str:
    return f"{pub['repository']} {pub['path']} @ {pub['commit']}"


def compare(values: pd.Series, published: str | None) -> dict | None:
    """One cell: the regenerated values (one per seed) against the published text. ``within_noise`` is
    None without several seeds (no noise estimate)."""
    v = values.dropna()
    if published is None or v.empty:
        return None
    pub = float(published)
    n = len(v)
    delta = float(v.mean()) - pub
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    within = bool(abs(delta) <= NOISE_SIGMAS * std) if n > 1 else None
    return {"published": pub, "delta": delta, "n": n, "std": std, "within_noise": within}


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "\u2212")


def delta_cell(c: dict | None) -> str:
    """``+0.49 ≈ (n=3)`` within 2 std of the seeds, ``−3.10 > 2σ (n=3)`` outside, ``+0.49`` for one run."""
    if c is None:
        return ""
    if c["within_noise"] is None:
        return _signed(c["delta"])
    return f"{_signed(c['delta'])} {'≈' if c['within_noise'] else f'> {NOISE_SIGMAS}σ'} (n={c['n']})"


def _applies(g: pd.DataFrame) -> dict | None:
    """The published row of an experiment (its rows ``g``): none for random init, whatever its preset."""
    r = g.iloc[0]
    return None if r.get("init") == "random" else for_preset(r.get("preset"))


def markdown_rows(g: pd.DataFrame, columns: list[str]) -> list[str]:
    """The rows under an experiment's row: ``Published (<source>)`` and ``Δ`` (none without a published row)."""
    pub = _applies(g)
    if pub is None:
        return []
    label = f"Published ({pub['name']})" + ("" if pub["relation"] == "reproduces" else ", for reference")
    cells = [pub["top1"].get(c, "") for c in columns]
    deltas = [delta_cell(compare(g[c], pub["top1"].get(c))) for c in columns]
    return [f"| {label} | " + " | ".join(cells) + " |", "| Δ | " + " | ".join(deltas) + " |"]


def note(g: pd.DataFrame) -> str | None:
    """The experiment's note on its published row (or on having none); None for random init."""
    r = g.iloc[0]
    if r.get("init") == "random":
        return None
    preset = r.get("preset")
    if not isinstance(preset, str):
        return f"{r['config']} vs published: preset not recorded (a probes.json given alone), no published row"
    pub = for_preset(preset)
    if pub is None:
        return f"{r['config']} vs published: no published numbers for {preset}"
    how = ("reproduces the published recipe and probe protocol" if pub["relation"] == "reproduces"
           else f"published row for reference, {pub['differs']}")
    if r.get("init") == "checkpoint":
        how += " (released weights, no pretraining here: the Δ measures the probe)"
    smoke = "SMOKE run: its Δ compares a few steps with the published run, not a result; " if r.get("smoke") else ""
    noise = (f"≈: |Δ| ≤ {NOISE_SIGMAS} std of its {len(g)} seeds (within seed noise)" if len(g) > 1
             else "one run: no seeds, so a Δ cannot be told from seed noise")
    return (f"{r['config']} vs published: {smoke}preset {preset}: {how}; published: {pub['model']}, "
            f"{source_text(pub)} ({pub['columns']}); Δ = regenerated − published; {noise}")


def annotate(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """benchmark.csv's published columns: per row ``<col>_published`` and ``<col>_delta`` (that row's value,
    or the seeds' mean on the aggregate row, minus the published), ``<col>_within_noise`` on an aggregate
    row, ``published_source`` and ``published_relation``; empty for an experiment without a published row."""
    out = table.copy()
    new = {f"{c}_{k}": [None] * len(out) for c in columns for k in ("published", "delta", "within_noise")}
    new.update(published_source=[None] * len(out), published_relation=[None] * len(out))
    for i, (_, r) in enumerate(out.iterrows()):
        pub = _applies(pd.DataFrame([r]))
        if pub is None:
            continue
        new["published_source"][i], new["published_relation"][i] = source_text(pub), pub["relation"]
        for c in (c for c in columns if c in pub["top1"]):
            new[f"{c}_published"][i] = float(pub["top1"][c])
            if not pd.isna(r[c]):
                new[f"{c}_delta"][i] = float(r[c]) - float(pub["top1"][c])
            if str(r.get("seed")) == "mean" and not pd.isna(r.get(f"{c}_std")):
                new[f"{c}_within_noise"][i] = bool(abs(new[f"{c}_delta"][i]) <= NOISE_SIGMAS * r[f"{c}_std"])
    for k, v in new.items():
        kind = "boolean" if k.endswith("_within_noise") else object if k.startswith("published_") else float
        out[k] = pd.Series(v, index=out.index, dtype=kind)
    return out
