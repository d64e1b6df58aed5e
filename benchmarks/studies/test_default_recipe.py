"""The default-recipe study's bookkeeping (benchmarks/studies/default_recipe.py) on hand-made trial folders:
the table marks what it should, the monitor columns read the curve as written. Outside the suite:
``.venv/bin/python -m pytest benchmarks/studies`` (a few seconds)."""
from __future__ import annotations

import json

import pytest
import yaml

from benchmarks.studies import default_recipe as dr


def _trial(root, name, top1, knn, curve, rc=0):
    folder = root / name
    weights = folder / "fmnist" / "weights" / "w"
    weights.mkdir(parents=True)
    rows = ["step,knn_k20"] + [f"{s},{v}" for s, v in curve] + ["937,"]  # a row without a monitor value
    (weights / "metrics.csv").write_text("\n".join(rows) + "\n")
    probes = folder / "fmnist" / "trial" / "probes.json"
    probes.parent.mkdir(parents=True)
    probes.write_text(json.dumps({"top1": dict(zip(dr.HEADS, top1)), "knn": {"top1": knn},
                                  "backbone": str(weights / "backbone.pth"), "pretrain_wall_s": 330.0,
                                  "probe_wall_s": 120.0, "pretrain_precision": "amp_bf16",
                                  "pretrain_commit": "a", "probe_commit": "a"}))
    (folder / "trial.json").write_text(json.dumps({"trial": name, "overrides": dr.TRIALS.get(name, {}), "rc": rc,
                                                   "wall_s": 1, "started": "t", "commit": "c", "machine": "m"}))


@pytest.fixture
def out(tmp_path, monkeypatch):
    monkeypatch.setattr(dr, "HERE", tmp_path / "out")
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def test_report_marks_cells_at_or_above_random_init(tmp_path, out):
    root = tmp_path / "trials"
    _trial(root, "random_init", [80, 80, 80, 80, 82.77, 80.58], 82.48, [(1, 75.1)])
    _trial(root, "warmup1.5", [81, 79, 80, 79, 82.77, 80.0], 83.0, [(250, 60.0), (500, 70.5), (936, 76.0)])
    _trial(root, "warmup2.0", [1, 1, 1, 1, 1, 1], 1, [(250, 1.0)], rc=1)  # failed: left out
    assert dr.report(root) == 0
    table = (out / "default_recipe.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| warmup1.5 |"))
    cells = [c.strip() for c in row.split("|")[3:13]]
    assert cells == ["**81.00**", "79.00", "**80.00**", "79.00", "**82.77**", "80.00", "**83.00**",
                     "60.00", "70.50", "76.00"]
    base = next(line for line in table.splitlines() if line.startswith("| random_init |"))
    assert "**" not in base  # the yardstick is not compared with itself
    assert "warmup2.0" not in table
    assert [r["trial"] for r in json.loads((out / "default_recipe.json").read_text())] == ["random_init", "warmup1.5"]
    assert (out / "default_recipe.png").stat().st_size > 10_000


def test_monitor_value_at_a_step_is_the_last_one_not_after_it():
    curve = [(100, 50.0), (250, 60.0), (400, 65.0)]
    assert dr._at(curve, 250) == 60.0 and dr._at(curve, 399) == 60.0 and dr._at(curve, 99) is None


def test_trial_config_is_the_default_experiment_with_the_trials_overrides(tmp_path):
    cfg = yaml.safe_load(dr._trial_config("warmup1.5_lr2e-3", tmp_path).read_text())
    assert cfg["results"] == str(tmp_path / "warmup1.5_lr2e-3")
    assert cfg["experiments"] == {"trial": {"dataset": "fmnist", "preset": "fmnist_r18_v1",
                                            "overrides": {"pretrain": {"warmup_epochs": 1.5, "lr": 0.002}}}}
    assert cfg["datasets"] == yaml.safe_load((dr.REPO / "config.yaml").read_text())["datasets"]


def test_the_winning_trial_is_the_new_default():
    from barlow.config import resolve
    from barlow.identity import weights_config

    assert weights_config(resolve("fmnist_r18")) == weights_config(resolve(dr.BASE, dr.TRIALS["warmup1.5_crop0.7"]))
    assert weights_config(resolve("fmnist_r18")) != weights_config(resolve(dr.BASE, dr.TRIALS["warmup1.5_crop0.5"]))


def test_unknown_trial_and_missing_data_stop_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no .*train.beton"):
        dr.run(["warmup1.5"], tmp_path, tmp_path / "nowhere")
    (tmp_path / "train.beton").write_bytes(b"")
    with pytest.raises(SystemExit, match="unknown trial 'nope'"):
        dr.run(["nope"], tmp_path, tmp_path)
