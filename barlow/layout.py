"""Where each stage's files live under the results directory: the one definition. The workflow's rules,
``status`` and the report take their paths from here, and identity (dataset, experiment, seed, weights
key) travels inside the files the stages write; nothing reads it back out of a path.

    <results>/data/<dataset>/<split>.beton, <split>.json          convert
    <results>/<dataset>/weights/<key>/backbone.pth                pretrain (checkpoint.pt, metrics.csv,
                                                                  tb/, job.json beside it)
    <results>/<dataset>/<experiment>[/seed<k>]/probes/<pass>.json probe, one file per pass
    <results>/<dataset>/<experiment>[/seed<k>]/probes.json        probe (the passes merged: one row)
    <results>/<dataset>/<experiment>[/seed<k>]/finetune/<p>pc.json fine-tune on p % of the labels (its
                                                                  .subset.json, and while it runs its
                                                                  .checkpoint.pt, beside it)
    <results>/benchmark.{md,csv,html}, <results>/plots/           report

Experiments whose weights config is equal (``barlow.identity.weights_config``: e.g.
``imagenet_r50_ep300`` and ``imagenet_r50_ep300_fastprobe``, which differ only in the probe) share one
``weights/<key>/`` folder, so one pretraining job. A run pretrained before these folders existed kept
its weights in its own folder (``<dataset>/<experiment>[/seed<k>]/backbone.pth``); found there (or its
checkpoint.pt), that folder stays its weights folder, so a finished or half-done run is neither
retrained nor lost.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

WEIGHTS = "weights"  # the weights folders' parent under <results>/<dataset>/: no experiment may be named so
TOP_LEVEL = ("data", "logs", "benchmarks", "plots", "smoke")  # folders under <results>/: no dataset may be named so
# what marks a folder as holding a run's pretraining (finished or resumable)
PRETRAIN_FILES = ("backbone.pth", "checkpoint.pt")


def results_dir(results: str, smoke: bool) -> str:
    """Smoke mode writes under <results>/smoke/, never beside a real run's protected outputs."""
    return os.path.join(results, "smoke") if smoke else results


def run_key(experiment: str, seed: int | None) -> str:
    """An experiment's run: its name, or "<name>/seed<k>" for each of its seeds (an experiment without
    seeds keeps its folder, so a finished run stays finished)."""
    return experiment if seed is None else f"{experiment}/seed{seed}"


def weights_key(wcfg: dict) -> str:
    """A person can read it (arch, init, epochs, seed) and it cannot collide (a hash of the whole
    weights config, as written: a default added to the schema later changes no key)."""
    p, m = wcfg.get("pretrain", {}), wcfg.get("model", {})
    digest = hashlib.sha256(json.dumps(wcfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]
    init = p.get("init", "barlow_twins")
    parts = [m.get("arch", "model"), {"barlow_twins": "bt"}.get(init, init)]
    if init == "barlow_twins" and "epochs" in p:
        parts.append(f"ep{p['epochs']:g}")
    if "seed" in p:
        parts.append(f"seed{p['seed']}")
    return "-".join(map(str, parts + [digest]))


def beton(results: str, dataset: str, split: str) -> str:
    return os.path.join(results, "data", dataset, f"{split}.beton")


def beton_summary(results: str, dataset: str, split: str) -> str:
    """The converter's summary beside a .beton (classes; for class folders the file list it names)."""
    return os.path.join(results, "data", dataset, f"{split}.json")


def run_dir(results: str, dataset: str, key: str) -> str:
    return os.path.join(results, dataset, key)


def probes_file(results: str, dataset: str, key: str) -> str:
    return os.path.join(run_dir(results, dataset, key), "probes.json")


def pass_file(results: str, dataset: str, key: str, name: str) -> str:
    return os.path.join(run_dir(results, dataset, key), "probes", f"{name}.json")


def pass_checkpoint(pass_json: str) -> str:
    """A probe pass's resume checkpoint, beside its output (passes run side by side)."""
    root, _ = os.path.splitext(pass_json)
    return root + ".checkpoint.pt"


def pass_job_dir(pass_json: str) -> str:
    """A probe pass's job folder (job.json, submitit logs): one per pass, beside its output."""
    return os.path.splitext(pass_json)[0]


def percent_tag(percent) -> str:
    """A fine-tune's percent as its file names write it: 1 -> "1", 0.5 -> "0.5" (a wildcard's text passes through)."""
    return percent if isinstance(percent, str) else f"{percent:g}"


def finetune_file(results: str, dataset: str, key: str, percent) -> str:
    return finetune_in(run_dir(results, dataset, key), percent)


def finetune_in(run_folder: str, percent) -> str:
    """A run's fine-tune result, from the run's folder (where its probes.json is)."""
    return os.path.join(run_folder, "finetune", f"{percent_tag(percent)}pc.json")


def finetune_subset(finetune_json: str) -> str:
    """The labelled subset a fine-tune trained on (indices, method, hash), beside its result."""
    root, _ = os.path.splitext(finetune_json)
    return root + ".subset.json"


def finetune_checkpoint(finetune_json: str) -> str:
    """A fine-tune's resume checkpoint, beside its result: deleted once the result is written, so never a
    declared output (a failed job's cleanup would delete it)."""
    root, _ = os.path.splitext(finetune_json)
    return root + ".checkpoint.pt"


def finetune_job_dir(finetune_json: str) -> str:
    """A fine-tune's job folder (job.json, submitit logs): one per percent, as the 1 % and 10 % jobs run side
    by side and a SLURM re-attach must find its own job."""
    return os.path.splitext(finetune_json)[0]


def shared_weights_dir(results: str, dataset: str, key: str) -> str:
    return os.path.join(results, dataset, WEIGHTS, key)


def metrics_beside(backbone: str) -> str:
    """Pretraining writes metrics.csv beside backbone.pth (in its weights folder)."""
    return os.path.join(os.path.dirname(os.path.abspath(backbone)), "metrics.csv")


def holds_pretraining(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in PRETRAIN_FILES)


@dataclasses.dataclass(frozen=True)
class Weights:
    """One pretraining: its folder (relative to the working directory, as Snakemake's paths are), its key,
    and the runs (``run_key``s) whose probes read it."""
    dir: str
    key: str
    dataset: str
    runs: tuple[str, ...]

    @property
    def backbone(self) -> str:
        return os.path.join(self.dir, "backbone.pth")


def assign_weights(results: str, runs: list[tuple[str, str, str]]) -> dict[str, Weights]:
    """``runs``: (run key, dataset, weights key) in config order -> run key -> its Weights. A run whose own
    folder already holds pretraining (the layout before weights folders) keeps it; the others share
    ``<dataset>/weights/<key>/``."""
    groups: dict[str, list[str]] = {}
    for key, dataset, wkey in runs:
        own = run_dir(results, dataset, key)
        folder = own if holds_pretraining(own) else shared_weights_dir(results, dataset, wkey)
        groups.setdefault(folder, []).append(key)
    by_run = {}
    for key, dataset, wkey in runs:
        own = run_dir(results, dataset, key)
        folder = own if own in groups else shared_weights_dir(results, dataset, wkey)
        by_run[key] = Weights(folder, wkey, dataset, tuple(groups[folder]))
    return by_run



# ---- the workflow's logs: the rules write them, status reads them -----------------------------------
def pretrain_log(results: str, weights_dir: str) -> str:
    return os.path.join(results, "logs", "pretrain", os.path.relpath(weights_dir, results) + ".log")


def probe_log(results: str, dataset: str, key: str, name: str) -> str:
    return os.path.join(results, "logs", "probe", f"{dataset}_{key}_{name}.log")


def merge_log(results: str, dataset: str, key: str) -> str:
    return os.path.join(results, "logs", "probe", f"{dataset}_{key}_merge.log")


def finetune_log(results: str, dataset: str, key: str, percent) -> str:
    return os.path.join(results, "logs", "finetune", f"{dataset}_{key}_{percent_tag(percent)}pc.log")


def finetune_benchmark(results: str, dataset: str, key: str, percent) -> str:
    return os.path.join(results, "benchmarks", "finetune", f"{dataset}_{key}_{percent_tag(percent)}pc.tsv")


def convert_log(results: str, dataset: str, split: str) -> str:
    return os.path.join(results, "logs", "convert", f"{dataset}_{split}.log")
