"""Training checkpoints and final backbone weights (both written atomically).

A checkpoint holds everything a resumed run needs to continue as if never stopped: model,
optimizer, AMP scaler, the optimizer-step counter (which fixes the epoch, the position inside it
and the learning rate), RNG states and the metrics history.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from barlow.atomic import save_torch
from barlow.errors import BadInput


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(path: Path, **state) -> None:
    save_torch({**state, "rng": rng_state()}, path)


def load(path: Path, arch: str) -> dict | None:
    """The checkpoint at ``path`` or None; a clear error when it is damaged or for another model."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises several types for damaged files
        raise BadInput(f"{path}: damaged checkpoint ({type(e).__name__}); delete it to restart this stage from scratch") from None
    if state.get("arch") != arch:
        raise BadInput(f"{path}: checkpoint is for {state.get('arch')!r}, the config says {arch!r}; "
                       "delete the checkpoint or fix model.arch")
    return state


def load_backbone(path: str | Path, arch: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: missing backbone weights; run the pretrain stage first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise BadInput(f"{path}: damaged weights file ({type(e).__name__}); delete it and rerun pretrain") from None
    if arch is not None and blob.get("arch") != arch:
        raise BadInput(f"{path}: weights are for {blob.get('arch')!r}, the config says {arch!r}")
    return blob
