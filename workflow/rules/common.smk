# Validate config.yaml, resolve each experiment (preset + overrides), and path helpers.
import copy
import json
import os
import re
import shlex
import sys

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from barlow import config as barlow_config
from barlow import launch as barlow_launch
from barlow.data import IMAGE_SIZE as CONVERT_IMAGE_SIZE
from barlow.errors import BadInput
from barlow.identity import pass_config, pass_names, runtime_config, weights_config

try:
    # One readable line for the first problem (snakemake's own validate prints the whole schema).
    barlow_config.validate(config, workflow.source_path("../schemas/config.schema.yaml"), "config")
except BadInput as e:
    sys.exit(f"error: {e}")
validate(config, "../schemas/config.schema.yaml", set_default=True)

# Smoke mode (`--config smoke=true`): every preset on a handful of images and a few steps, into
# <results>/smoke/ so that it never meets a real run's protected outputs.
SMOKE = str(config.get("smoke", False)).lower() == "true"
RESULTS = os.path.join(config.get("results", "results"), "smoke") if SMOKE else config.get("results", "results")
# The interpreter that runs Snakemake (the project's venv) runs the stages too: its folder goes first
# on PATH, so the rules say plain `python`; with per-rule conda environments (envs/barlow.yaml)
# `python` is the env's own. (Not a param: a moved checkout must not rerun everything.)
envvars:
    "PATH",


if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
DATASETS = config["datasets"]
# One key per pretraining + probe: the experiment's name, or "<name>/seed<k>" for each of its `seeds`
# (its own folder <dataset>/<name>/seed<k>/); an experiment without seeds keeps its folder, so a
# finished run stays finished.
EXPERIMENTS = {}
EXP_DATASET = {}
EXP_NAME = {}
EXP_SEED = {}
for _name, _exp in config["experiments"].items():
    if _exp["dataset"] not in DATASETS:
        sys.exit(f"error: config.experiments.{_name}.dataset {_exp['dataset']!r}: not in datasets "
                 f"({', '.join(DATASETS)}); add it under datasets: or fix the name")
    try:
        # fill=False: the params hash the experiment as written. Filled in, every default would become
        # part of the hash, and a run finished before a default was added to the schema would be redone;
        # the stages fill the defaults in themselves (barlow.config.complete).
        _cfg = barlow_config.resolve(_exp["preset"], _exp.get("overrides"), where=f"config.experiments.{_name}",
                                     fill=False)
    except BadInput as e:
        sys.exit(f"error: {e}")
    try:
        _cfg = barlow_config.apply_dataset(_cfg, DATASETS[_exp["dataset"]], f"config.experiments.{_name}")
    except BadInput as e:
        sys.exit(f"error: {e}")
    _ck = _cfg["pretrain"].get("checkpoint", {}).get("path")
    if _cfg["pretrain"]["init"] == "checkpoint" and not os.path.isfile(os.path.expanduser(_ck)):
        sys.exit(f"error: config.experiments.{_name}.overrides.pretrain.checkpoint.path "
                 f"{_ck!r}: no such file; download the weights there first "
                 "(nothing is fetched at run time; README, 'Probe a released model')")
    _cfg = barlow_config.smoke(_cfg) if SMOKE else _cfg
    for _seed in _exp.get("seeds", [None]):
        _key, _run = _name, _cfg
        if _seed is not None:
            # last, so that neither the preset, the overrides nor smoke mode can undo it
            _key, _run = f"{_name}/seed{_seed}", copy.deepcopy(_cfg)
            _run["pretrain"]["seed"] = _seed
            if "probe" in _run:
                _run["probe"]["seed"] = _seed
        EXPERIMENTS[_key], EXP_DATASET[_key], EXP_NAME[_key], EXP_SEED[_key] = _run, _exp["dataset"], _name, _seed
if SMOKE:
    DATASETS = {k: {**barlow_config.SMOKE_CONVERT, **v} for k, v in DATASETS.items()}


wildcard_constraints:
    split="train|val",
    pass_="[A-Za-z0-9_]+",
    dataset="|".join(map(re.escape, DATASETS)),
    exp="|".join(map(re.escape, EXPERIMENTS)),


def exp_dataset(exp):
    return EXP_DATASET[exp]


def beton(dataset, split):
    return f"{RESULTS}/data/{dataset}/{split}.beton"


def run_dir(exp):
    return f"{RESULTS}/{exp_dataset(exp)}/{exp}"


def quoted_json(obj):
    return shlex.quote(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def pretrain_config(wildcards):
    """Only what changes the trained weights (barlow.identity): a probe setting or a runtime knob
    (decode threads, checkpoint cadence) must not retrain; those travel as a resource."""
    return quoted_json(weights_config(EXPERIMENTS[wildcards.exp]))


def runtime_json(wildcards):
    return json.dumps(runtime_config(EXPERIMENTS[wildcards.exp]), sort_keys=True)


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
    """The weights a probe reads: the pretrain rule's backbone.pth, or with `pretrain.init: checkpoint`
    the released file itself (so no pretraining job is scheduled for that experiment)."""
    p = EXPERIMENTS[wildcards.exp]["pretrain"]
    if p["init"] == "checkpoint":
        return os.path.expanduser(p["checkpoint"]["path"])
    return f"{RESULTS}/{wildcards.dataset}/{wildcards.exp}/backbone.pth"


def all_probes():
    return [f"{run_dir(e)}/probes.json" for e in EXPERIMENTS]



def convert_inputs(wildcards):
    ds = DATASETS[wildcards.dataset]
    if ds["kind"] == "image_folder" and wildcards.split == "val":
        return {"classes": f"{RESULTS}/data/{wildcards.dataset}/train.json"}  # val must match train's classes
    return {}


def pass_outputs(wildcards):
    return [f"{run_dir(wildcards.exp)}/probes/{name}.json" for name in pass_names(EXPERIMENTS[wildcards.exp])]
