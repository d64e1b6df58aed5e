"""What each output depends on: the one definition behind re-running and resuming.

A resolved experiment mixes *learning* settings (they change what a stage computes) with *runtime*
knobs (decode threads, checkpoint cadence: how fast it runs and how often it saves). Snakemake's
params (what makes a rule rerun), the pretraining checkpoint's compatibility check and the probe
checkpoint's all use these functions, so a thread count can never retrain a finished 300-epoch run
and a changed learning rate can never resume another experiment's checkpoint.

- ``weights_config``: what the pretrained weights depend on (model, data, pretrain);
- ``pass_config``: what one probe pass's result depends on (the weights, the probe-wide settings
  and that pass alone: editing one pass never reruns the other);
- ``finetune_config``: what one semi-supervised fine-tune depends on (the weights, the finetune
  settings and its percent of the labels);
- ``runtime_config``: the knobs, passed to the stages beside the learning config.
"""
from __future__ import annotations

import copy

# Settings that change how fast a stage runs or how often it saves, never what it computes.
RUNTIME = {"pretrain": ("workers", "checkpoint_every_steps", "monitor"), "probe": ("workers", "checkpoint_every_steps"),
           # fractions: which fine-tunes the workflow runs; each run's own percent is in finetune_config
           "finetune": ("workers", "checkpoint_every_steps", "fractions")}


def _without_runtime(cfg: dict, section: str) -> dict:
    return {k: copy.deepcopy(v) for k, v in cfg.get(section, {}).items() if k not in RUNTIME.get(section, ())}


def weights_config(cfg: dict) -> dict:
    """``pretrain.init: checkpoint``: the file's path is left out; the file travels as the probe's input
    (Snakemake sees a changed path or a newer file there) and its sha256 identifies the weights."""
    pretrain = _without_runtime(cfg, "pretrain")
    if "checkpoint" in pretrain:
        pretrain["checkpoint"] = {k: v for k, v in pretrain["checkpoint"].items() if k != "path"}
    return {"model": copy.deepcopy(cfg["model"]), "data": copy.deepcopy(cfg.get("data", {})), "pretrain": pretrain}


def pass_names(cfg: dict) -> list[str]:
    return [p["name"] for p in cfg.get("probe", {}).get("passes", [])]


def pass_config(cfg: dict, name: str) -> dict:
    """The experiment as one probe pass sees it: the weights' config and the probe with only ``name``."""
    probe = _without_runtime(cfg, "probe")
    probe["passes"] = [copy.deepcopy(p) for p in cfg["probe"]["passes"] if p["name"] == name]
    if not probe["passes"]:
        raise KeyError(f"probe pass {name!r}: not in {pass_names(cfg)}")
    return {**weights_config(cfg), "probe": probe}


def learning_config(cfg: dict) -> dict:
    """Everything a result depends on: the weights' config and the probe less its runtime knobs."""
    out = weights_config(cfg)
    if "probe" in cfg:
        out["probe"] = _without_runtime(cfg, "probe")
    return out


def finetune_config(cfg: dict, percent: float) -> dict:
    """What one fine-tune's result depends on: the weights' config, the finetune section less its runtime
    knobs, and the percent of the train labels it uses (the probe section plays no part)."""
    return {**weights_config(cfg), "finetune": {**_without_runtime(cfg, "finetune"), "percent": percent}}


def runtime_config(cfg: dict) -> dict:
    return {s: {k: cfg[s][k] for k in keys if k in cfg.get(s, {})} for s, keys in RUNTIME.items() if s in cfg}


def first_difference(old, new, key: str = "") -> str:
    """The first difference between two (learning) configs as 'key: old -> new', '' when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            d = first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if d:
                return d
        return ""
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            d = first_difference(a, b, f"{key}[{i}]")
            if d:
                return d
        return ""
    if old != new:
        def short(v):
            text = repr(v)
            return text if len(text) <= 60 else text[:57] + "..."
        return f"{key}: {short(old)} -> {short(new)}"
    return ""
