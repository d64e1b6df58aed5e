"""Resolve an experiment: preset YAML (``barlow/presets/<name>.yaml``) deep-merged with overrides,
then validated against ``barlow/schemas/experiment.schema.yaml``.

Errors come out as one line naming the offending key, e.g.
``experiments.fmnist_bt.pretrain.epochs: -1 is less than the minimum of 0``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from barlow.errors import BadInput

HERE = Path(__file__).parent
PRESETS = HERE / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
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


def validate(cfg: dict, schema_file: str | Path, where: str) -> dict:
    """Raise BadInput with the first (deepest) schema violation as one line."""
    import jsonschema

    schema = load_yaml(schema_file)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), str(e.absolute_path)), reverse=True)
    if errors:
        e = errors[0]
        loc = ".".join([where, *map(str, e.absolute_path)]) if where else ".".join(map(str, e.absolute_path))
        raise BadInput(f"{loc}: {e.message}" + (f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""))
    return cfg


def resolve(preset: str, overrides: dict | None = None, where: str = "experiment") -> dict:
    cfg = deep_merge(load_preset(preset), overrides or {})
    return validate(cfg, HERE / "schemas" / "experiment.schema.yaml", where)
