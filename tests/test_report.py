"""The report from result files only: published table format, CSV with provenance, PNG plots."""
import json

import numpy as np
import pandas as pd
import pytest

from barlow.errors import BadInput
from barlow.report import report


def _run(root, name, init, top1):
    d = root / "fmnist" / name
    d.mkdir(parents=True)
    (d / "probes.json").write_text(json.dumps({
        "top1": dict(zip(["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"], top1)),
        "protocol": "fast", "init": init, "pretrain_epochs": 0 if init == "random" else 3, "pretrain_steps": 10,
        "pretrain_commit": "abc123", "pretrain_wall_s": 1.0, "probe_wall_s": 2.0, "train_images": 100,
        "val_images": 50, "seed": 0, "config": {"model": {"arch": "resnet18"}, "pretrain": {"seed": 0}}}))
    if init != "random":
        pd.DataFrame({"step": [1, 2, 3], "epoch": [0.1, 0.2, 0.3], "loss": [900.0, 800.0, 700.0],
                      "lr": [0.1, 0.2, 0.3], "samples_per_s": [1, 1, 1], "elapsed_s": [1, 2, 3]}).to_csv(d / "metrics.csv", index=False)
    return d / "probes.json"


def test_table_csv_and_plots(tmp_path, monkeypatch):
    import barlow.report as rep

    figures = {}
    real_save = rep._save

    def keep(fig, out):
        figures[out.name] = [(ax.get_title(), [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata()))
                                               for ln in ax.lines]) for ax in fig.axes]
        real_save(fig, out)

    monkeypatch.setattr(rep, "_save", keep)
    runs = [_run(tmp_path, "bt", "barlow_twins", [15.514, 33.98, 45.96, 61.9, 71.01, 71.666]),
            _run(tmp_path, "rand", "random", [10, 11, 12, 13, 14, 15])]
    report(runs, tmp_path / "out", provenance={"config_file": "config.yaml"})
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| config | Feature1 | Feature2 | Feature3 | Feature4 | Feature5 | AvgPool |" in md
    assert "| bt | 15.51 | 33.98 | 45.96 | 61.90 | 71.01 | 71.67 |" in md
    assert "| Random init (rand) | 10.00 | 11.00 | 12.00 | 13.00 | 14.00 | 15.00 |" in md
    df = pd.read_csv(tmp_path / "out" / "benchmark.csv")
    assert list(df.columns[:8]) == ["dataset", "config", "Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool"]
    assert df.loc[0, "commit"] == "abc123" and df.loc[0, "config_file"] == "config.yaml"
    # what the plots show: the values given above, read back from the figures
    (title, lines), = figures["top1_by_feature.png"]
    assert [ln[0] for ln in lines] == ["fmnist/bt", "fmnist/rand"]
    assert lines[0][1] == ["Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool"]
    assert lines[0][2] == pytest.approx([15.514, 33.98, 45.96, 61.9, 71.01, 71.666])
    assert lines[1][2] == pytest.approx([10, 11, 12, 13, 14, 15])
    (loss_title, loss_lines), (lr_title, lr_lines) = figures["pretrain_curves.png"]
    assert "loss" in loss_title and lr_title == "learning rate"
    assert [ln[0] for ln in loss_lines] == ["fmnist/bt"]  # random init has no curve
    assert loss_lines[0][1] == [1, 2, 3] and loss_lines[0][2] == [900.0, 800.0, 700.0]
    assert lr_lines[0][2] == pytest.approx([0.1, 0.2, 0.3])
    from PIL import Image

    for png, size in (("top1_by_feature.png", (960, 540)), ("pretrain_curves.png", (1320, 480))):
        img = Image.open(tmp_path / "out" / "plots" / png).convert("L")
        assert img.size == size  # figsize x dpi 120
        assert len(np.unique(np.asarray(img))) > 20  # drawn, not blank


def test_unreadable_result_names_the_file(tmp_path):
    bad = tmp_path / "d" / "x" / "probes.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(BadInput, match=r"probes.json: unreadable probe result"):
        report([bad], tmp_path / "out")
