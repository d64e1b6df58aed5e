"""The probes' resume checkpoint.

Rank 0 writes ``<output stem>.checkpoint.pt`` beside the output (every
``probe.checkpoint_every_steps`` optimizer steps, at each epoch end and after each pass): heads,
optimizers, the step within the pass, the generator of the cached protocol's order, the torch RNG
state at the pass start, and the finished passes' results. A rerun resumes from it and ends with
the very heads of an unbroken run (tests/test_probe_resume.py); the checkpoint is deleted once the
output is written. A checkpoint of another config or other backbone weights is refused.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from barlow.atomic import save_torch
from barlow.config import with_defaults
from barlow.distributed import Env
from barlow.errors import BadInput
from barlow.identity import first_difference, learning_config


def checkpoint_path(out: str | Path) -> Path:
    """The resume checkpoint of the probe run writing ``out`` (one per output: passes run side by side)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.checkpoint.pt")


class Checkpointer:
    """Rank 0 writes the probes' resume checkpoint; every rank reads and checks it."""

    def __init__(self, path: Path, cfg: dict, backbone_path, env: Env, every: int, sha: str | None = None):
        self.path, self.cfg, self.env, self.every = path, cfg, env, max(1, int(every))
        self.backbone_path = Path(backbone_path)
        self.wall_before = 0.0
        self._sha = sha  # the backbone file's sha256 (hashed on first use when not given)

    def backbone_sha(self) -> str:
        if self._sha is None:
            from barlow.weights import sha256

            self._sha = sha256(self.backbone_path)
        return self._sha

    def save(self, pass_index: int, results: dict, rng: torch.Tensor, trainers, step: int, generator, t0: float,
             knn: dict | None = None):
        if not self.env.main:
            return
        blob = {"config": _resume_view(self.cfg), "backbone_sha256": self.backbone_sha(), "pass": pass_index,
                "results": dict(results), "rng": rng, "step": step, "generator": generator,
                "wall_s": self.wall_before + time.time() - t0, "knn": knn}
        if trainers:
            blob["heads"] = {t.name: _to_cpu(t.head.state_dict()) for t in trainers}
            blob["optimizers"] = {t.name: _to_cpu(t.opt.state_dict()) for t in trainers}
        save_torch(blob, self.path)

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            # weights_only: it holds only tensors and plain types (heads, optimizers, RNG states as tensors)
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types for damaged files
            raise BadInput(f"{self.path}: damaged probe checkpoint ({type(e).__name__}); delete it to restart the "
                           "probes from scratch") from None
        diff = _config_diff(state.get("config", {}), _resume_view(self.cfg))
        if diff:
            raise BadInput(f"{self.path}: made with another probe config ({diff}); delete it to restart the probes "
                           "with this config, or restore the old setting")
        if state.get("backbone_sha256") != self.backbone_sha():
            raise BadInput(f"{self.path}: made for other backbone weights than {self.backbone_path} (retrained "
                           "since?); delete it to restart the probes")
        return state


def _to_cpu(obj):
    """Tensors in a (nested) state dict copied to the CPU; meta tensors (no data) saved as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach() if obj.is_meta else obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _resume_view(cfg: dict) -> dict:
    """What a probe checkpoint must agree on (barlow.identity: the experiment less its runtime knobs)."""
    return learning_config(cfg)


def _config_diff(old, new) -> str:
    """Both sides with today's defaults: a checkpoint written before a default was filled in still resumes."""
    return first_difference(learning_config(with_defaults(old)), learning_config(with_defaults(new)))
