# Snakemake wiring only: the runs come from barlow.config.experiments, every path from barlow.layout.
import json
import os
import re
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

from barlow import config as barlow_config
from barlow import launch as barlow_launch
from barlow import layout
from barlow.convert import IMAGE_SIZE as CONVERT_IMAGE_SIZE
from barlow.errors import BadInput
from barlow.identity import finetune_config, pass_config, pass_names, runtime_config, weights_config

try:
    barlow_config.validate_workflow(config)  # once, defaults filled in; the first problem as one line
    SMOKE = barlow_config.is_smoke(config["smoke"])
    RUNS = barlow_config.experiments(config, SMOKE)  # run key ("<exp>" or "<exp>/seed<k>") -> Run
    barlow_config.check_inputs(RUNS)
except BadInput as e:
    sys.exit(f"error: {e}")
RESULTS = layout.results_dir(config["results"], SMOKE)
DATASETS = barlow_config.datasets(config, SMOKE)
# run key -> its pretraining folder: experiments with equal weights configs share one
WEIGHTS = barlow_config.weights_folders(RESULTS, RUNS)
# weights folder (relative to RESULTS: the pretrain rule's wildcard) -> the first run that reads it
WEIGHTS_RUN = {}
for _key, _w in WEIGHTS.items():
    WEIGHTS_RUN.setdefault(os.path.relpath(_w.dir, RESULTS), _key)
for _dir, _key in WEIGHTS_RUN.items():
    if len(WEIGHTS[_key].runs) > 1:
        print(f"note: {', '.join(WEIGHTS[_key].runs)} share one pretraining ({_dir})", file=sys.stderr)

# The interpreter that runs Snakemake (the project's venv) runs the stages too: its folder goes first
# on PATH, so the rules say plain `python`; with per-rule conda environments (envs/barlow.yaml)
# `python` is the env's own. (Not a param: a moved checkout must not rerun everything.)
envvars:
    "PATH",


if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


wildcard_constraints:
    split="train|val",
    pass_="[A-Za-z0-9_]+",
    dataset="|".join(map(re.escape, DATASETS)),
    exp="|".join(map(re.escape, RUNS)),
    weights="|".join(map(re.escape, WEIGHTS_RUN)) or "(?!)",  # (no run pretrains: matches nothing)
    percent=r"\d+(?:\.\d+)?",  # a fine-tune's percent of the train labels (layout.percent_tag)


def beton(dataset, split):
    return layout.beton(RESULTS, dataset, split)


def quoted_json(obj):
    return shlex.quote(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def weights_run(wildcards):
    return RUNS[WEIGHTS_RUN[wildcards.weights]]


def pretrain_config(wildcards):
    """Only what changes the trained weights (barlow.identity): a probe setting or a runtime knob
    (decode threads, checkpoint cadence) must not retrain; those travel as a resource."""
    return quoted_json(weights_config(weights_run(wildcards).cfg))


def knobs_json(run, **identity):
    """Runtime knobs (barlow.identity) and the run's identity, which the stage writes into its outputs:
    a resource, not a param, so neither reruns a finished stage."""
    return json.dumps({**runtime_config(run.cfg), "identity": {"dataset": run.dataset, **identity}}, sort_keys=True)


def pretrain_knobs(wildcards):
    w = WEIGHTS[WEIGHTS_RUN[wildcards.weights]]
    return knobs_json(weights_run(wildcards), weights_key=w.key, runs=list(w.runs))


def probe_knobs(wildcards):
    r = RUNS[wildcards.exp]
    return knobs_json(r, experiment=r.experiment, seed=r.seed, smoke=SMOKE,
                      weights_key=WEIGHTS[r.key].key if r.key in WEIGHTS else None)


def launcher(stage):
    """Launcher settings as a resource, not a param: switching local -> slurm must not retrain."""
    lc = config.get("launcher", {})
    job = dict(lc.get(stage, {}))
    job["executor"] = lc.get("executor")  # (barlow.launch fills in what is not set)
    for key in ("partition", "account", "qos"):
        job[key] = job.get(key) or os.environ.get(f"SLURM_{key.upper()}")
    return json.dumps({k: v for k, v in job.items() if v is not None}, sort_keys=True)


def local_threads(stage):
    """Cores a stage occupies on *this* machine: all it asks for when it runs here, none when it
    only waits on a SLURM job. Keeps `--cores 2` from running two 2-thread stages at once."""
    job = barlow_launch.complete(json.loads(launcher(stage)), stage)
    if job["executor"] == "slurm":
        return 1
    # not workflow.cores: it raises when no --cores is given (`snakemake --report`); Snakemake caps
    # threads at --cores anyway
    return job["cpus_per_task"]


def backbone_input(wildcards):
    """The weights a probe reads: its (shared) pretraining's backbone.pth, or with `pretrain.init:
    checkpoint` the released file itself (so no pretraining job is scheduled for that experiment)."""
    p = RUNS[wildcards.exp].cfg["pretrain"]
    if p["init"] == "checkpoint":
        return os.path.expanduser(p["checkpoint"]["path"])
    return WEIGHTS[wildcards.exp].backbone


def finetune_percents(run):
    """Its fine-tunes' file tag (layout.percent_tag) -> the percent as configured: the number, not the
    wildcard's text, goes into params (1, not "1" or 1.0: a retyped number would rerun it)."""
    return {layout.percent_tag(p): p for p in barlow_config.finetune_fractions(run)}


def finetune_params(wildcards):
    """Only what the fine-tune's result depends on (barlow.identity.finetune_config): the weights' config and
    the finetune learning settings; a probe edit, a runtime knob or another fraction reruns nothing here.
    Less its percent, which is no schema key: --percent and the output path carry it."""
    r = RUNS[wildcards.exp]
    percents = finetune_percents(r)
    if wildcards.percent not in percents:
        raise BadInput(f"{wildcards.exp}: no fine-tune at {wildcards.percent} % (finetune.fractions: "
                       f"{', '.join(percents) or 'none: the experiment has no finetune: true'})")
    cfg = finetune_config(r.cfg, percents[wildcards.percent])
    return quoted_json({**cfg, "finetune": {k: v for k, v in cfg["finetune"].items() if k != "percent"}})


def finetune_knobs(wildcards):
    r = RUNS[wildcards.exp]
    return knobs_json(r, experiment=r.experiment, seed=r.seed, smoke=SMOKE, percent=finetune_percents(r)[wildcards.percent],
                      weights_key=WEIGHTS[r.key].key if r.key in WEIGHTS else None)


def run_finetunes(key):
    r = RUNS[key]
    return [layout.finetune_file(RESULTS, r.dataset, key, p) for p in barlow_config.finetune_fractions(r)]


def all_finetunes():
    return [f for k in RUNS for f in run_finetunes(k)]


def all_probes():
    return [layout.probes_file(RESULTS, r.dataset, k) for k, r in RUNS.items()]


def report_runs():
    """The report's rows: each probes.json with its identity and its pretraining's metrics.csv."""
    return [{"probes": layout.probes_file(RESULTS, r.dataset, k), "dataset": r.dataset, "experiment": r.experiment,
             "seed": r.seed, "metrics": os.path.join(WEIGHTS[k].dir, "metrics.csv") if k in WEIGHTS else None,
             "preset": config["experiments"][r.experiment]["preset"],  # the published row it is compared with
             "smoke": SMOKE,
             # only where there are some: the report's params of a run without fine-tunes stay as they were
             **({"finetune": run_finetunes(k)} if run_finetunes(k) else {})} for k, r in RUNS.items()]


def convert_inputs(wildcards):
    ds = DATASETS[wildcards.dataset]
    if ds["kind"] == "image_folder" and wildcards.split == "val":
        return {"classes": f"{RESULTS}/data/{wildcards.dataset}/train.json"}  # val must match train's classes
    return {}


def pass_outputs(wildcards):
    r = RUNS[wildcards.exp]
    return [layout.pass_file(RESULTS, r.dataset, r.key, name) for name in pass_names(r.cfg)]
