"""Resolve an experiment: preset YAML (``barlow/presets/<name>.yaml``) deep-merged with overrides,
then validated against ``barlow/schemas/experiment.schema.yaml``.

Errors come out as one line naming the offending key, e.g.
``experiments.fmnist_bt.pretrain.epochs: -1 is less than the minimum of 0``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import re
from pathlib import Path

import yaml

from barlow import layout
from barlow.errors import BadInput
from barlow.identity import weights_config

HERE = Path(__file__).parent
PRESETS = HERE / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


# libyaml's parser where PyYAML was built with it (its wheels are): the same safe constructors, ~6x faster
# than the pure-Python one (the presets and schemas are read in every stage process: 68 ms of a launcher's start)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        data = yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return data or {}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_preset(name: str) -> dict:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise BadInput(f"preset {name!r}: unknown; choose one of {', '.join(preset_names())}")
    data = load_yaml(path)
    parent = data.pop("extends", None)
    return deep_merge(load_preset(parent), data) if parent else data


@functools.lru_cache(maxsize=None)
def _validator(schema_file: str, fill: bool):
    """One validator per schema file (read once per process: every stage entry and resume check
    validates). With ``fill`` it also writes each schema ``default`` into the instance: jsonschema's own
    recipe (its FAQ, "Why doesn't my schema's default property set the default on my instance?"); the
    library validates only. A default of ``{}`` (e.g. ``pretrain.monitor``) lets the defaults inside it
    fill too, because the properties are descended into after the parent's value is set."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    schema = load_yaml(schema_file)
    if not fill:
        return base(schema)
    check_properties = base.VALIDATORS["properties"]

    def properties(validator, props, instance, sub):
        if isinstance(instance, dict):
            for key, prop in props.items():
                if isinstance(prop, dict) and "default" in prop and key not in instance:
                    instance[key] = copy.deepcopy(prop["default"])
        yield from check_properties(validator, props, instance, sub)

    return jsonschema.validators.extend(base, {"properties": properties})(schema)


def validate(cfg: dict, schema_file: str | Path, where: str, fill: bool = False) -> dict:
    """Raise BadInput with the first (deepest) schema violation as one line; ``fill`` writes the
    schema's defaults into ``cfg`` (in place): the only place a setting's default is written down."""
    validator = _validator(str(schema_file), fill)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), str(e.absolute_path)), reverse=True)
    if errors:
        e = errors[0]
        loc = ".".join([where, *map(str, e.absolute_path)]) if where else ".".join(map(str, e.absolute_path))
        raise BadInput(f"{loc}: {e.message}" + (f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""))
    return cfg


EXPERIMENT_SCHEMA = HERE / "schemas" / "experiment.schema.yaml"


def complete(cfg: dict, where: str = "experiment") -> dict:
    """A copy of ``cfg`` validated, every default of the schema filled in; idempotent."""
    return validate(copy.deepcopy(cfg), EXPERIMENT_SCHEMA, where, fill=True)


def with_defaults(cfg: dict) -> dict:
    """``complete`` without the checks: for a config stored by an earlier run (a checkpoint's), so that
    it compares equal to today's when only the defaults it left out were filled in since."""
    out = copy.deepcopy(cfg)
    for _ in _validator(str(EXPERIMENT_SCHEMA), True).iter_errors(out):
        pass
    return out


def resolve(preset: str, overrides: dict | None = None, where: str = "experiment", fill: bool = True) -> dict:
    """The preset merged with ``overrides`` and validated; ``fill`` writes in the schema's defaults
    (the workflow hashes the experiment as written instead: common.smk says why)."""
    cfg = deep_merge(load_preset(preset), overrides or {})
    validate(cfg, EXPERIMENT_SCHEMA, where, fill=fill)
    if "checkpoint" in cfg["pretrain"] and cfg["pretrain"]["init"] != "checkpoint":
        raise BadInput(f"{where}.pretrain.checkpoint: given, but pretrain.init is {cfg['pretrain']['init']!r}; "
                       "set init: checkpoint to probe that file, or drop checkpoint:")
    if cfg["pretrain"]["init"] == "checkpoint" and not cfg["pretrain"]["checkpoint"].get("path"):
        raise BadInput(f"{where}.pretrain.checkpoint.path: missing; give the downloaded weights file, e.g. "
                       "checkpoint: {path: /data/weights/resnet50.pth}")
    return cfg


# Smoke mode: the real preset (model, image size, loss, optimizer, precision, probe protocol and
# every code path) on a handful of images and a few steps per stage, so a preset can be checked in
# minutes before queueing a multi-day run. Results go to <results>/smoke/, never beside real ones.
SMOKE_BATCH = 16          # global pretraining batch (divisible by accumulation 1, 2, 4, 8, 16)
SMOKE_STEPS = 2           # optimizer steps: a step after the first (state carried over), then the checkpoint
SMOKE_IMAGES = 32         # images used by pretraining and by each probe pass
SMOKE_PROBE_BATCH = 8
SMOKE_CONVERT = {"limit_train": 64, "limit_val": 32}
SMOKE_FINETUNE_PERCENT = 40  # of the train labels: the fine-tune's one fraction in smoke mode


def smoke(cfg: dict) -> dict:
    """``cfg`` shrunk to smoke size; shapes, semantics and protocols unchanged.

    The as-trained loss keeps the recipe's number of groups (8 GPUs' worth): its group shrinks
    with the batch, so the per-group standardisation and the gradient scale stay those of the
    recipe.
    """
    out = copy.deepcopy(cfg)
    p = out["pretrain"]
    if p.get("loss_group"):
        groups = max(1, p["batch_size"] // p["loss_group"])
        # at least 2 samples a group (one sample standardises to zeros): a recipe of more than 8 groups
        # (imagenet100_r18_ep1000: 32 groups of 64) keeps 8 of 2 in smoke mode
        p["loss_group"] = max(2, SMOKE_BATCH // groups)
    full = with_defaults(cfg)  # the workflow passes the experiment as written (no defaults filled)
    # one checkpoint (the last step's, written when the run ends): nothing resumes a smoke run, and
    # ResNet-50's with the 8192-d projector is 1.4 GB
    p.update(batch_size=SMOKE_BATCH, max_steps=SMOKE_STEPS, limit_train=SMOKE_IMAGES,
             checkpoint_every_steps=SMOKE_STEPS, workers=min(full["pretrain"]["workers"], 2), cpu_fp16="auto")
    if "probe" in out:
        out["probe"]["limit_train"] = SMOKE_IMAGES
        out["probe"]["workers"] = min(full["probe"]["workers"], 2)
        for ps in out["probe"]["passes"]:
            ps.update(epochs=1, batch_size=SMOKE_PROBE_BATCH)
            for h in ps.get("head_overrides", {}).values():
                if "epochs" in h:
                    h["epochs"] = 1
    # (added when absent: the defaults would fine-tune 20 epochs at batch 256, more than a smoke .beton holds)
    ft = out.setdefault("finetune", {})
    workers = with_defaults({**cfg, "finetune": dict(ft)})["finetune"]["workers"]
    # balanced, not SimCLR's lists: a smoke .beton samples ~64 of ImageNet's 1.28 M images, so it holds none of
    # the listed ones (the list mapping is tested in tests/test_finetune_subset.py instead). 40 % of a smoke
    # .beton (48-64 images) is at least one global batch of SMOKE_BATCH (2 images a rank on 8), and every
    # class of the first 64 Fashion-MNIST images (3 at least) can give its share
    ft.update(epochs=1, batch_size=SMOKE_BATCH, fractions=[SMOKE_FINETUNE_PERCENT], subset="balanced",
              workers=min(workers, 2))
    out["description"] = "SMOKE: " + out.get("description", "")
    return out


_shrink = smoke  # (experiments() has a parameter of that name)


def apply_dataset(cfg: dict, dataset: dict, where: str) -> dict:
    """The dataset's ``image_size`` (when it sets one) replaces the preset's; a size that contradicts
    the preset's augmentation crop sizes stops with one line naming both."""
    size = dataset.get("image_size")
    if size is None:
        return cfg
    out = copy.deepcopy(cfg)
    out.setdefault("data", {})["image_size"] = size
    for view in ("view1", "view2"):
        crop = out["pretrain"].get("augment", {}).get(view, {}).get("size")
        if crop is not None and crop != size:
            raise BadInput(f"{where}: the dataset's image_size {size} contradicts the preset's pretrain.augment."
                           f"{view}.size {crop}; drop image_size from the dataset (the preset says {crop}) or choose "
                           "a preset made for this size")
    return out


# ---- the runs of a workflow config (config.yaml): what the Snakefile, status and tests resolve alike ----
CONFIG_SCHEMA = HERE.parent / "workflow" / "schemas" / "config.schema.yaml"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One pretraining + probe of the table: an experiment, or one seed of it."""
    experiment: str
    seed: int | None
    dataset: str
    cfg: dict  # preset + overrides + dataset + smoke mode + seed, as written (the stages fill the defaults)
    finetune: bool = False  # the experiment opted in to the fine-tune (config.yaml: finetune: true)

    @property
    def key(self) -> str:
        return layout.run_key(self.experiment, self.seed)

    @property
    def weights_key(self) -> str:
        return layout.weights_key(weights_config(self.cfg))


def is_smoke(value) -> bool:
    return str(value).lower() == "true"  # `--config smoke=true` passes a string


def _check_names(wf: dict, section: str, reserved: tuple[str, ...]) -> None:
    """Names become folders and Snakemake wildcards; YAML turns an unquoted `off:` into False."""
    for name in wf.get(section) or {}:
        if not isinstance(name, str):
            raise BadInput(f"config.{section}: the name {name!r} is a YAML {type(name).__name__}, not a string "
                           "(unquoted on/off/yes/no/true/false and numbers are read so); quote it, e.g. \"off\":")
        if not NAME.fullmatch(name) or name in reserved:
            why = f"{name!r} is reserved for the results layout" if name in reserved else \
                f"{name!r} is not a folder name (letters, digits, _ . -, starting with a letter or digit)"
            raise BadInput(f"config.{section}.{name}: {why}; rename it")


def validate_workflow(wf: dict) -> dict:
    """config.yaml checked once, in place, its schema's defaults filled in (what Snakemake's
    ``validate(set_default=True)`` would do, with the first problem as one line)."""
    _check_names(wf, "datasets", layout.TOP_LEVEL)
    _check_names(wf, "experiments", (layout.WEIGHTS,))
    return validate(wf, CONFIG_SCHEMA, "config", fill=True)


def datasets(wf: dict, smoke: bool) -> dict[str, dict]:
    """The datasets as the convert stage sees them: in smoke mode a handful of images of each."""
    return {k: {**SMOKE_CONVERT, **v} for k, v in wf["datasets"].items()} if smoke else wf["datasets"]


def experiments(wf: dict, smoke: bool | None = None) -> dict[str, Run]:
    """The runs of a validated workflow config (``validate_workflow``), by run key, in config order.

    Each experiment is resolved without the schema's defaults filled in: Snakemake hashes it as written,
    and filled in, every default would become part of the hash, so a run finished before a default was
    added to the schema would be redone. A seed is applied last, so that neither the preset, the
    overrides nor smoke mode can undo it."""
    smoke = is_smoke(wf.get("smoke", False)) if smoke is None else smoke
    out = {}
    for name, exp in wf["experiments"].items():
        where = f"config.experiments.{name}"
        if exp["dataset"] not in wf["datasets"]:
            raise BadInput(f"{where}.dataset {exp['dataset']!r}: not in datasets ({', '.join(wf['datasets'])}); "
                           "add it under datasets: or fix the name")
        cfg = apply_dataset(resolve(exp["preset"], exp.get("overrides"), where=where, fill=False),
                            wf["datasets"][exp["dataset"]], where)
        cfg = _shrink(cfg) if smoke else cfg
        for seed in exp.get("seeds", [None]):
            run = cfg
            if seed is not None:
                run = copy.deepcopy(cfg)
                run["pretrain"]["seed"] = seed
                if "probe" in run:
                    run["probe"]["seed"] = seed
                if exp.get("finetune"):  # (only then: a section added to the others would change nothing but noise)
                    run.setdefault("finetune", {})["seed"] = seed
            r = Run(name, seed, exp["dataset"], run, bool(exp.get("finetune")))
            out[r.key] = r
    return out


def finetune_fractions(run: Run) -> list:
    """The percents a run fine-tunes on, one job each: none unless its experiment opted in; the schema's
    default (1 and 10) where its config (or smoke mode) sets none."""
    if not run.finetune:
        return []
    return with_defaults({**run.cfg, "finetune": dict(run.cfg.get("finetune") or {})})["finetune"]["fractions"]


def weights_folders(results: str, runs: dict[str, Run]) -> dict[str, layout.Weights]:
    """Run key -> its pretraining's folder (barlow.layout.assign_weights): experiments with equal weights
    configs share one; a released checkpoint (``pretrain.init: checkpoint``) is its own weights, so none."""
    return layout.assign_weights(results, [(k, r.dataset, r.weights_key) for k, r in runs.items()
                                           if r.cfg["pretrain"]["init"] != "checkpoint"])


def check_inputs(runs: dict[str, Run]) -> None:
    """What a run reads that no stage makes: a released checkpoint must already be on disk."""
    for r in runs.values():
        p = r.cfg["pretrain"]
        if p["init"] == "checkpoint" and not Path(p["checkpoint"]["path"]).expanduser().is_file():
            raise BadInput(f"config.experiments.{r.experiment}.overrides.pretrain.checkpoint.path "
                           f"{p['checkpoint']['path']!r}: no such file; download the weights there first "
                           "(nothing is fetched at run time; README, 'Probe a released model')")
