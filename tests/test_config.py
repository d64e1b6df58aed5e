"""Defaults live in the schemas only (barlow/schemas/*.schema.yaml), filled in once at validation."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from barlow import config, launch
from barlow.errors import BadInput

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "barlow" / "schemas" / "experiment.schema.yaml").read_text())
MINIMAL = {"model": {"arch": "resnet18", "projector": [64, 64]}, "data": {},
           "pretrain": {"init": "barlow_twins", "epochs": 1, "batch_size": 8, "optimizer": "lars", "lr": 0.2},
           "probe": {"protocol": "p", "passes": [{"name": "a", "heads": ["avgpool"], "epochs": 1, "batch_size": 8,
                                                   "optimizer": "sgd", "lr": 0.1}]}}


def _defaults(props: dict) -> dict:
    """{key: default} of one ``properties`` block, read straight from the YAML (not via jsonschema)."""
    return {k: v["default"] for k, v in props.items() if isinstance(v, dict) and "default" in v}


def test_complete_fills_every_schema_default_and_keeps_what_is_given():
    cfg = config.complete(MINIMAL)
    top = SCHEMA["properties"]
    for section in ("model", "data", "pretrain", "probe"):
        for key, value in _defaults(top[section]["properties"]).items():
            if value != {}:  # (a section filled in: checked key by key below)
                assert cfg[section][key] == value, f"{section}.{key}"
    for key, value in _defaults(top["pretrain"]["properties"]["monitor"]["properties"]).items():
        assert cfg["pretrain"]["monitor"][key] == value, f"pretrain.monitor.{key}"
    for key, value in _defaults(SCHEMA["$defs"]["probe_pass"]["properties"]).items():
        assert cfg["probe"]["passes"][0][key] == value, f"probe.passes[0].{key}"
    # hand-checked values the stages used to hard-code
    assert cfg["data"]["image_size"] == 224 and cfg["pretrain"]["lambd"] == 0.0051
    assert cfg["pretrain"]["monitor"] == {"enabled": True, "every_steps": 250, "at_epoch_end": False, "bank": 2000,
                                          "queries": 1000, "linear_lr": 0.001, "batch_size": 256}
    assert cfg["pretrain"]["tf32"] is False  # IEEE fp32 on the GPU, as the published V100 runs computed
    given = config.complete(config.deep_merge(MINIMAL, {"pretrain": {"lambd": 0.01, "monitor": {"bank": 7}}}))
    assert given["pretrain"]["lambd"] == 0.01 and given["pretrain"]["monitor"]["bank"] == 7
    assert given["pretrain"]["monitor"]["queries"] == 1000
    assert "checkpoint" not in cfg["pretrain"]  # no default for a section whose presence means something
    assert MINIMAL["data"] == {}  # the caller's dict is left alone
    assert config.complete(cfg) == cfg  # idempotent


def test_complete_still_refuses_bad_values_in_one_line():
    with pytest.raises(BadInput, match=r"^experiment\.pretrain\.monitor\.every_steps: 0 is less than the minimum of 1$"):
        config.complete(config.deep_merge(MINIMAL, {"pretrain": {"monitor": {"every_steps": 0}}}))


def test_a_checkpoint_config_written_without_defaults_still_matches():
    """A run checkpointed before the defaults were filled in stores its config as written; the resume
    checks fill both sides, so it resumes (and a real difference is still found)."""
    from barlow.pretrain_checkpoint import config_diff
    from barlow.probe_resume import _config_diff, _resume_view

    old = copy.deepcopy(MINIMAL)
    new = config.complete(MINIMAL)
    assert config_diff(old, new) == ""
    assert _config_diff(_resume_view(old), _resume_view(new)) == ""
    assert config_diff(old, config.complete(config.deep_merge(MINIMAL, {"pretrain": {"lambd": 0.01}}))) \
        == "pretrain.lambd: 0.0051 -> 0.01"
    explicit = config.deep_merge(MINIMAL, {"probe": {"passes": [{**MINIMAL["probe"]["passes"][0], "gamma": 0.5}]}})
    assert _config_diff(_resume_view(old), _resume_view(config.complete(explicit))) == \
        "probe.passes[0].gamma: 0.1 -> 0.5"


def test_resolve_fills_unless_told_not_to():
    assert "monitor" not in config.resolve("fmnist_r18", fill=False)["pretrain"]
    assert "projector_bias" not in config.resolve("fmnist_r18", fill=False)["model"]
    assert config.resolve("fmnist_r18")["pretrain"]["monitor"]["every_steps"] == 250
    assert config.resolve("fmnist_r18")["model"]["projector_bias"] is True


def test_launcher_defaults_come_from_its_schema():
    schema = yaml.safe_load((REPO / "barlow" / "schemas" / "launcher.schema.yaml").read_text())
    out = launch.complete({}, "probe")
    for key, value in _defaults(schema["properties"]).items():
        assert out[key] == value, key
    assert out["executor"] == "local" and out["timeout_min"] == 24 * 60 and out["poll_s"] == 0.1
    assert launch.complete({"executor": "slurm"}, "probe")["poll_s"] == 2.0
    with pytest.raises(BadInput, match=r"^launcher\.pretrain: Additional properties are not allowed \('nodez'"):
        launch.complete({"nodez": 2}, "pretrain")


# `.get("<key>", <literal>)` in the stages, for a key whose default the schema holds: a second copy of
# that default, which would silently win over the schema's on a config that skipped validation. A fallback
# to the same key of another mapping (`.get("epochs", pcfg["epochs"])`: a head inheriting its pass's) is no copy.
_GET = re.compile(r"""\.get\(\s*["']([a-z_0-9]+)["']\s*,\s*+(?!\{\}|\[\]|None\b|\w+\[["']\1["']\])[^)]""")


def _schema_keys_with_defaults(node, out: set) -> set:
    if isinstance(node, dict):
        for key, value in (node.get("properties") or {}).items():
            if isinstance(value, dict) and "default" in value:
                out.add(key)
        for value in node.values():
            _schema_keys_with_defaults(value, out)
    elif isinstance(node, list):
        for value in node:
            _schema_keys_with_defaults(value, out)
    return out


def test_no_stage_repeats_a_schema_default():
    keys = set()
    for name in ("experiment", "launcher"):
        _schema_keys_with_defaults(yaml.safe_load((REPO / "barlow" / "schemas" / f"{name}.schema.yaml").read_text()),
                                   keys)
    assert {"image_size", "workers", "seed", "lambd", "executor", "timeout_min"} <= keys
    found = []
    for path in sorted((REPO / "barlow").glob("*.py")) + sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in _GET.finditer(line):
                if m.group(1) in keys:
                    found.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not found, "defaults repeated outside the schemas:\n" + "\n".join(found)


# ---- the runs of a workflow config (what common.smk and status both call) ---------------------------
def _workflow(**experiments) -> dict:
    return {"datasets": {"fmnist": {"kind": "fashion_mnist", "path": "/x", "image_size": 32}},
            "experiments": experiments}


def test_experiments_resolve_preset_overrides_dataset_seeds_and_smoke():
    wf = config.validate_workflow(_workflow(
        bt={"dataset": "fmnist", "preset": "fmnist_r18", "seeds": [0, 3],
            "overrides": {"pretrain": {"epochs": 5}}},
        rand={"dataset": "fmnist", "preset": "fmnist_r18", "overrides": {"pretrain": {"init": "random"}}}))
    assert wf["results"] == "results" and wf["datasets"]["fmnist"]["write_mode"] == "raw"  # schema defaults, once
    runs = config.experiments(wf)
    assert list(runs) == ["bt/seed0", "bt/seed3", "rand"]
    r = runs["bt/seed3"]
    assert (r.experiment, r.seed, r.dataset) == ("bt", 3, "fmnist")
    assert r.cfg["pretrain"]["seed"] == r.cfg["probe"]["seed"] == 3 and r.cfg["pretrain"]["epochs"] == 5
    assert "workers" not in r.cfg["pretrain"] or r.cfg["pretrain"]["workers"] == config.load_preset("fmnist_r18")["pretrain"].get("workers")
    smoke = config.experiments(wf, smoke=True)["bt/seed3"].cfg
    assert smoke["pretrain"]["max_steps"] == config.SMOKE_STEPS and smoke["pretrain"]["seed"] == 3  # the seed last
    assert config.experiments({**wf, "smoke": "true"})["rand"].cfg["pretrain"]["max_steps"] == config.SMOKE_STEPS
    assert config.datasets(wf, True)["fmnist"]["limit_train"] == config.SMOKE_CONVERT["limit_train"]


def test_experiments_that_differ_only_in_the_probe_share_weights():
    wf = config.validate_workflow({
        "datasets": {"inet": {"kind": "image_folder", "path": "/x", "image_size": 224}},
        "experiments": {"base": {"dataset": "inet", "preset": "imagenet_r50_ep300"},
                        "fast": {"dataset": "inet", "preset": "imagenet_r50_ep300_fastprobe"},
                        "other_seed": {"dataset": "inet", "preset": "imagenet_r50_ep300",
                                       "overrides": {"pretrain": {"seed": 7}}}}})
    runs = config.experiments(wf, smoke=True)
    # the presets' own files: fastprobe changes nothing the weights depend on
    assert config.load_preset("imagenet_r50_ep300_fastprobe")["probe"] != config.load_preset("imagenet_r50_ep300")["probe"]
    assert runs["base"].weights_key == runs["fast"].weights_key != runs["other_seed"].weights_key
    assert runs["base"].weights_key.startswith("resnet50-bt-ep300-")


@pytest.mark.parametrize("yaml_text, says", [
    ("off: {dataset: fmnist, preset: fmnist_r18}", r"config.experiments: the name False is a YAML bool.*quote it"),
    ("yes: {dataset: fmnist, preset: fmnist_r18}", r"the name True is a YAML bool"),
    ("2024: {dataset: fmnist, preset: fmnist_r18}", r"the name 2024 is a YAML int"),
    ("weights: {dataset: fmnist, preset: fmnist_r18}", r"config.experiments.weights: 'weights' is reserved.*rename it"),
    ("a/b: {dataset: fmnist, preset: fmnist_r18}", r"config.experiments.a/b: 'a/b' is not a folder name"),
])
def test_a_name_that_is_not_a_folder_name_stops_with_one_line(yaml_text, says):
    wf = {"datasets": {"fmnist": {"kind": "fashion_mnist", "path": "/x"}},
          "experiments": yaml.safe_load(yaml_text)}
    with pytest.raises(BadInput, match=says) as e:
        config.validate_workflow(wf)
    assert "\n" not in str(e.value)


def test_a_dataset_named_after_a_results_folder_stops():
    wf = {"datasets": {"data": {"kind": "fashion_mnist", "path": "/x"}},
          "experiments": {"bt": {"dataset": "data", "preset": "fmnist_r18"}}}
    with pytest.raises(BadInput, match=r"config.datasets.data: 'data' is reserved for the results layout"):
        config.validate_workflow(wf)


def test_a_released_checkpoint_must_be_on_disk(tmp_path):
    wf = config.validate_workflow(_workflow(rel={"dataset": "fmnist", "preset": "fmnist_r18", "overrides": {
        "pretrain": {"init": "checkpoint", "checkpoint": {"path": str(tmp_path / "missing.pth")}}}}))
    runs = config.experiments(wf)
    with pytest.raises(BadInput, match=r"checkpoint.path .*missing.pth': no such file; download the weights there"):
        config.check_inputs(runs)
    (tmp_path / "missing.pth").write_bytes(b"x")
    config.check_inputs(runs)


def test_libyaml_reads_every_yaml_file_of_the_project_as_the_pure_python_loader_does():
    """config.SAFE_LOADER (libyaml's CSafeLoader where PyYAML has it) against PyYAML's own pure-Python
    SafeLoader, on every YAML file the project reads: presets, schemas, published numbers, workflow configs."""
    repo = Path(config.__file__).resolve().parent.parent
    files = sorted({*repo.glob("barlow/**/*.yaml"), *repo.glob("workflow/**/*.yaml"), *repo.glob("slurm/*.yaml"),
                    repo / "config.yaml"})
    assert len(files) >= 20 and config.SAFE_LOADER is yaml.CSafeLoader
    for f in files:
        text = f.read_text()
        assert yaml.load(text, Loader=config.SAFE_LOADER) == yaml.load(text, Loader=yaml.SafeLoader), f
