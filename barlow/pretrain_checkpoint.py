"""Pretraining's files besides the metrics: the resume checkpoint (written by ``save_checkpoint``, read
back by ``resume``), the final backbone.pth (``save_backbone``), and ``finish_from_checkpoint``, which
writes that file from a finished checkpoint without a job. A checkpoint of another experiment is
recognised by ``config_diff``."""
from __future__ import annotations

from pathlib import Path

from torch.utils.serialization import config as serialization_config

from barlow import checkpoint
from barlow.atomic import save_torch
from barlow.config import complete, with_defaults
from barlow.errors import BadInput
from barlow.identity import first_difference, weights_config
from barlow.model import BarlowTwins
from barlow.provenance import git_commit


def config_diff(old: dict, new: dict) -> str:
    """First difference between two experiments in what the weights depend on (barlow.identity); both
    with today's defaults, so a checkpoint written before a default was filled in still resumes."""
    return first_difference(weights_config(with_defaults(old)), weights_config(with_defaults(new)))


def save_backbone(path: Path, model: BarlowTwins, cfg: dict, info: dict) -> None:
    state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    save_torch({"arch": cfg["model"]["arch"], "state_dict": state, "config": cfg, **info}, path)


def save_checkpoint(path: Path, cfg: dict, model, r, step: int, rows: list, wall_s) -> None:
    """The resume checkpoint after optimizer step ``step`` (``r``: the run's optimizer, scaler, monitor,
    total and precision; ``wall_s()``: the training time so far)."""
    checkpoint.save(path, arch=cfg["model"]["arch"], model=model.state_dict(), optimizer=r.opt.state_dict(),
                    scaler=r.scaler.state_dict(), step=step, metrics=rows, config=cfg,
                    monitor=r.monitor.state_dict() if r.monitor is not None else None,
                    wall_s=wall_s(), total=r.total, precision=r.precision)


def resume(ckpt_path: Path, cfg, model, r, env) -> dict | None:
    """Load the last checkpoint of this experiment into model, optimizer, scaler, RNGs and monitor;
    None when there is none. Another experiment's checkpoint stops with one line naming the difference."""
    state = checkpoint.load(ckpt_path, cfg["model"]["arch"])
    if state is None:
        return None
    diff = config_diff(state.get("config", {}), cfg)
    if diff:
        raise BadInput(f"{ckpt_path}: was trained with another config ({diff}); training it further would mix "
                       "two experiments. Move the checkpoint away to retrain, or restore the old setting")
    model.load_state_dict(state["model"])
    r.opt.load_state_dict(state["optimizer"])
    r.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    if r.monitor is not None:
        r.monitor.load_state_dict(state.get("monitor"))
    if env.main:
        print(f"resuming from {ckpt_path} at step {state['step']}/{r.total} "
              f"(epoch {state['step'] // r.steps_per_epoch})", flush=True)
    return state


def finish_from_checkpoint(cfg: dict, out: str | Path, identity: dict | None = None) -> bool:
    """Write ``out`` from a checkpoint.pt whose training had finished, here, without a job (True if so).

    After a Snakemake restart ``--rerun-incomplete`` deletes a finished run's backbone.pth (its job
    was still marked running), and a job that died while writing it leaves the same state: without
    this, a whole multi-GPU allocation would be queued just to save the weights again.
    """
    out = Path(out)
    cfg = complete(cfg)
    # Memory-mapped: this runs on every launch of the stage, and the checkpoint holds the optimizer state
    # besides the weights (GBs for ResNet-50 + an 8192^3 projector); mapped, only what is read here comes off
    # disk: the small fields and, when it writes ``out``, the backbone's weights, never the optimizer state.
    # checkpoint.load keeps its checks; torch.load takes the mmap setting from torch's serialization config
    # (it needs the zipfile format, which torch.save writes).
    with serialization_config.patch({"load.mmap": True}):
        state = checkpoint.load(out.parent / "checkpoint.pt", cfg["model"]["arch"])
    if state is None or out.exists() or "total" not in state or state["step"] < state["total"]:
        return False
    if config_diff(state.get("config", {}), cfg):
        return False  # another experiment's: pretrain() refuses it with the difference named
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    save_torch({"arch": cfg["model"]["arch"], "state_dict": weights, "config": cfg, "epochs": cfg["pretrain"]["epochs"],
                "steps": state["step"], "commit": git_commit(), "wall_s": round(state.get("wall_s", 0.0), 1),
                "precision": state.get("precision"), "identity": identity}, out)
    print(f"wrote {out} from the finished {out.parent / 'checkpoint.pt'} (step {state['step']}/{state['total']}); "
          "no job needed", flush=True)
    return True
