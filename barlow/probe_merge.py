"""Merging one experiment's probe pass results into its probes.json (the ``merge-probes`` command).

Light on purpose: it imports neither torch nor FFCV, so the command starts fast.
"""
from __future__ import annotations

import os
from pathlib import Path

from barlow import layout
from barlow.atomic import write_json
from barlow.errors import BadInput


def merge_passes(parts: list[str | Path], out: str | Path) -> dict:
    """One experiment's pass results (each a ``run_probes`` output) -> its probes.json (one table row)."""
    import json

    blobs = []
    for path in map(Path, parts):
        try:
            blobs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: unreadable probe pass result ({type(e).__name__}); rerun that probe pass") from None
    merged = dict(blobs[0])
    merged["config"] = json.loads(json.dumps(blobs[0]["config"]))
    merged["config"]["probe"]["passes"] = [p for b in blobs for p in b["config"]["probe"]["passes"]]
    merged["top1"] = {k: v for b in blobs for k, v in b["top1"].items()}
    merged["knn"] = next((b["knn"] for b in reversed(blobs) if b.get("knn")), None)  # the AvgPool pass's, as top1
    merged["dims"] = {k: v for b in blobs for k, v in b["dims"].items()}
    merged["probe_wall_s"] = round(sum(b.get("probe_wall_s") or 0 for b in blobs), 1)
    merged["passes"] = {p["name"]: str(path) for b, path in zip(blobs, parts) for p in b["config"]["probe"]["passes"]}
    if "identity" in merged:  # the pretraining's metrics.csv, relative to probes.json (the tree moves as one)
        merged["identity"] = {**merged["identity"], "metrics": os.path.relpath(
            layout.metrics_beside(merged["backbone"]), os.path.dirname(os.path.abspath(out)))}
    for key in ("backbone", "backbone_sha256", "pretrain_commit", "train_images", "val_images", "identity"):
        values = {json.dumps(b.get(key)) for b in blobs}
        if len(values) > 1:
            raise BadInput(f"{out}: its passes disagree on {key} ({', '.join(sorted(values))}); rerun the probes")
    write_json(out, merged)
    return merged
