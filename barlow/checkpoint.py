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
    """The checkpoint at ``path`` or None; a clear error when it is damaged or for another model.

    ``weights_only=False`` on purpose, and only here: checkpoint.pt is the resume file this run
    writes into its own (locked) run folder, never a file from elsewhere, and it holds numpy's RNG
    state (an ndarray inside a tuple), which weights_only loading would refuse. Every file that may
    come from elsewhere (backbone.pth, a released checkpoint) goes through ``barlow.weights.safe_load``.
    """
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
    """Our backbone.pth, loaded with ``weights_only=True`` (``barlow.weights.safe_load``): the probe may
    be handed one copied from anywhere, and it holds only tensors and plain types (arch, state_dict,
    config, epochs, steps, wall_s, commit, precision)."""
    from barlow.weights import safe_load

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: missing backbone weights; run the pretrain stage first")
    blob = safe_load(path, what="backbone weights file")
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise BadInput(f"{path}: not a backbone.pth of this project (no 'state_dict'); for a released checkpoint "
                       "use pretrain.init: checkpoint")
    if arch is not None and blob.get("arch") != arch:
        raise BadInput(f"{path}: weights are for {blob.get('arch')!r}, the config says {arch!r}")
    return blob
