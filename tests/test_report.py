"""The report from result files only: published table format, CSV with provenance, PNG plots.

Expected values are computed by hand from the numbers the tests write; the plots are checked by
what they draw (the values read back from the figure) and by the saved PNG's pixels there.
"""
import json

import numpy as np
import pandas as pd
import pytest

from barlow.errors import BadInput
from barlow.report import report

HEADS = ["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"]
MONITOR_COLUMNS = ["step", "epoch", "loss", "lr", "samples_per_s", "elapsed_s", "knn_k20", "knn_k200", "linear_top1",
                   "monitor_s"]


def _run(root, name, init, top1, seed=None, knn=None, metrics="old"):
    """A probes.json as the probe stage writes it (``seed``: in <name>/seed<k>/), with a metrics.csv:
    ``old`` (the six columns of runs before the monitor), a DataFrame, or None (no file)."""
    d = root / "fmnist" / name / ("" if seed is None else f"seed{seed}")
    d.mkdir(parents=True)
    (d / "probes.json").write_text(json.dumps({
        "top1": dict(zip(HEADS, top1)), "knn": None if knn is None else {"k": 20, "top1": knn, "top1_k200": knn - 1},
        "protocol": "fast", "init": init, "pretrain_epochs": 0 if init == "random" else 3, "pretrain_steps": 10,
        "pretrain_commit": "abc123", "pretrain_wall_s": 1.0, "probe_wall_s": 2.0, "train_images": 100,
        "val_images": 50, "seed": seed or 0,
        "identity": {"dataset": "fmnist", "experiment": name, "seed": seed, "metrics": "metrics.csv"},
        "config": {"model": {"arch": "resnet18"}, "pretrain": {"seed": 0 if seed is None else seed}}}))
    if isinstance(metrics, str) and metrics == "old":
        pd.DataFrame({"step": [1, 2, 3], "epoch": [0.1, 0.2, 0.3], "loss": [900.0, 800.0, 700.0],
                      "lr": [0.1, 0.2, 0.3], "samples_per_s": [1, 1, 1], "elapsed_s": [1, 2, 3]}).to_csv(d / "metrics.csv", index=False)
    elif metrics is not None:
        metrics.to_csv(d / "metrics.csv", index=False)
    return d / "probes.json"


@pytest.fixture
def figures(monkeypatch):
    """What each plot draws, by file name: per axes its title, lines (label, x, y, style), texts, error
    bars, and the saved PNG with the function mapping a data point to its pixel there."""
    import barlow.report as rep

    drawn, real_save = {}, rep._save

    def keep(fig, out):
        real_save(fig, out)  # draws the figure: axis limits are final from here on
        from PIL import Image

        img = np.asarray(Image.open(out).convert("RGB"))
        scale = img.shape[0] / fig.bbox.height  # the PNG's dpi over the figure's

        def pixel(ax, x, y):
            px, py = ax.transData.transform((x, y)) * scale
            return tuple(int(v) for v in img[img.shape[0] - 1 - int(round(py)), int(round(px))])

        drawn[out.name] = {"png": img, "pixel": pixel, "axes": [
            {"ax": ax, "title": ax.get_title(), "texts": [(t.get_text(), getattr(t, "xy", None)) for t in ax.texts],
             "lines": [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata()), ln.get_linestyle(), ln.get_color())
                       for ln in ax.lines],
             "errorbars": [(c.get_label(), list(c.lines[0].get_ydata()), [seg.tolist() for seg in c.lines[2][0].get_segments()])
                           for c in ax.containers]}
            for ax in fig.axes]}

    monkeypatch.setattr(rep, "_save", keep)
    return drawn


def rgb(color) -> tuple:
    from matplotlib.colors import to_rgb

    return tuple(round(255 * v) for v in to_rgb(color))


def close(a, b, tol=40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_table_csv_and_plots(tmp_path, figures):
    runs = [_run(tmp_path, "bt", "barlow_twins", [15.514, 33.98, 45.96, 61.9, 71.01, 71.666], knn=64.125),
            _run(tmp_path, "rand", "random", [10, 11, 12, 13, 14, 15], metrics=None)]
    report(runs, tmp_path / "out", provenance={"config_file": "config.yaml"})
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| config | Feature1 | Feature2 | Feature3 | Feature4 | Feature5 | AvgPool | kNN |\n" in md
    assert "| bt | 15.51 | 33.98 | 45.96 | 61.90 | 71.01 | 71.67 | 64.12 |\n" in md  # 64.125 -> 64.12 (half-even)
    assert "| Random init (rand) | 10.00 | 11.00 | 12.00 | 13.00 | 14.00 | 15.00 |  |\n" in md  # no kNN: empty
    assert "online kNN" not in md  # no monitor values: no crossing note
    df = pd.read_csv(tmp_path / "out" / "benchmark.csv")
    assert list(df.columns[:9]) == ["dataset", "config", "Feature1", "Feature2", "Feature3", "Feature4", "Feature5",
                                    "AvgPool", "kNN"]
    assert df.loc[0, "commit"] == "abc123" and df.loc[0, "config_file"] == "config.yaml"
    assert df["kNN"].iloc[0] == pytest.approx(64.12, abs=0.011) and pd.isna(df["kNN"].iloc[1])
    assert df["kNN_k200"].iloc[0] == pytest.approx(63.12, abs=0.011)
    assert len(df) == 2 and df["n_seeds"].isna().all()  # single runs: no aggregate rows
    # what the plots show: the values given above, read back from the figures
    top1 = figures["top1_by_feature.png"]
    (ax,) = top1["axes"]
    assert [ln[0] for ln in ax["lines"]] == ["fmnist/bt", "fmnist/rand"]
    assert ax["lines"][0][1] == ["Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool"]
    assert ax["lines"][0][2] == pytest.approx([15.514, 33.98, 45.96, 61.9, 71.01, 71.666])
    assert ax["lines"][1][2] == pytest.approx([10, 11, 12, 13, 14, 15])
    # ... and in the PNG: each line's marker colour at its Feature1 and AvgPool points
    for i, (_, _, ys, _, color) in enumerate(ax["lines"]):
        for x in (0, 5):
            assert close(top1["pixel"](ax["ax"], x, ys[x]), rgb(color)), (i, x)
    curves = figures["pretrain_curves.png"]["axes"]
    assert "loss" in curves[0]["title"] and curves[1]["title"] == "learning rate"
    assert [ln[0] for ln in curves[0]["lines"]] == ["fmnist/bt"]  # random init has no curve
    assert curves[0]["lines"][0][1:3] == ([1, 2, 3], [900.0, 800.0, 700.0])
    assert curves[1]["lines"][0][2] == pytest.approx([0.1, 0.2, 0.3])
    monitor = figures["monitor_curves.png"]
    assert (tmp_path / "out" / "plots" / "monitor_curves.png").is_file()
    assert monitor["axes"][0]["texts"][0][0].startswith("No online monitor values")
    assert not monitor["axes"][0]["lines"]


def test_seeds_give_mean_std_cells_and_aggregate_csv_rows(tmp_path, figures):
    # bt, seeds 0-2: Feature1 80, 82, 84 -> mean 82, sample std sqrt((4 + 0 + 4) / 2) = 2
    #   AvgPool 70, 71, 75 -> mean 72, std sqrt((4 + 1 + 9) / 2) = sqrt(7) = 2.6458
    #   kNN 60, 61 and none -> mean 60.5, std sqrt((0.25 + 0.25) / 1) = 0.7071, over 2 seeds
    runs = [_run(tmp_path, "bt", "barlow_twins", [80, 50, 50, 50, 50, 70], seed=0, knn=60.0),
            _run(tmp_path, "bt", "barlow_twins", [82, 50, 50, 50, 50, 71], seed=1, knn=61.0),
            _run(tmp_path, "bt", "barlow_twins", [84, 50, 50, 50, 50, 75], seed=2),
            _run(tmp_path, "solo", "barlow_twins", [81.5, 1, 2, 3, 4, 5], seed=7, knn=40.0),
            _run(tmp_path, "rand", "random", [10, 11, 12, 13, 14, 15], metrics=None)]
    report(runs, tmp_path / "out")
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert ("| bt | 82.00 ± 2.00 (3) | 50.00 ± 0.00 (3) | 50.00 ± 0.00 (3) | 50.00 ± 0.00 (3) | 50.00 ± 0.00 (3) "
            "| 72.00 ± 2.65 (3) | 60.50 ± 0.71 (2) |\n") in md
    assert "| solo | 81.50 | 1.00 | 2.00 | 3.00 | 4.00 | 5.00 | 40.00 |\n" in md  # one seed: plain numbers
    assert md.count("| bt |") == 1 and "bt: resnet18, 3 pretraining epochs" in md and "seeds 0, 1, 2" in md

    html = (tmp_path / "out" / "benchmark.html").read_text()  # the CSV shown in Snakemake's report
    for cell in ("<td>82.00</td>", "<td>mean</td>", "<td>2.65</td>", "<td>40.00</td>"):
        assert cell in html, cell
    df = pd.read_csv(tmp_path / "out" / "benchmark.csv", dtype={"seed": str})
    assert list(zip(df["config"], df["seed"])) == [("bt", "0"), ("bt", "1"), ("bt", "2"), ("bt", "mean"),
                                                   ("solo", "7"), ("rand", "0")]
    assert set(df["dataset"]) == {"fmnist"}
    seeds, agg = df[df["seed"].isin(["0", "1", "2"]) & (df["config"] == "bt")], df[df["seed"] == "mean"].iloc[0]
    assert list(seeds["Feature1"]) == [80, 82, 84] and list(seeds["AvgPool"]) == [70, 71, 75]
    assert seeds["n_seeds"].isna().all() and seeds["Feature1_std"].isna().all()
    assert (agg["Feature1"], agg["Feature1_std"], agg["AvgPool"], agg["AvgPool_std"]) == (82, 2, 72, 2.65)
    assert (agg["kNN"], agg["kNN_std"], agg["n_seeds"]) == (60.5, 0.71, 3)
    assert agg["commit"] == "abc123" and agg["arch"] == "resnet18"  # what the seeds share
    assert pd.isna(agg["probe_seed"]) and list(seeds["probe_seed"]) == [0, 1, 2]  # what they do not

    (ax,) = figures["top1_by_feature.png"]["axes"]
    ((label, ys, bars),) = ax["errorbars"]  # bt only: its means, and one bar per feature from mean - std to mean + std
    means, stds = [82, 50, 50, 50, 50, 72], [2, 0, 0, 0, 0, 7 ** 0.5]
    assert label == "fmnist/bt (mean ± std, 3 seeds)" and ys == pytest.approx(means)
    assert [v for (x0, lo), (_, hi) in bars for v in (x0, lo, hi)] == pytest.approx(
        [v for i, (m, s) in enumerate(zip(means, stds)) for v in (i, m - s, m + s)])
    assert [ln[0] for ln in ax["lines"] if not ln[0].startswith("_")] == ["fmnist/solo", "fmnist/rand"]


def monitor_metrics(evals: dict[int, float], linear: dict[int, float], steps_per_epoch: int = 250,
                    last: int = 400) -> pd.DataFrame:
    """A new-format metrics.csv: a step-0 evaluation row (no loss, lr, throughput), then one row per
    optimizer step, the monitor's columns filled at the evaluated steps only."""
    rows = [{"step": 0, "epoch": 0.0, "knn_k20": evals[0], "knn_k200": evals[0] - 2, "linear_top1": linear[0],
             "monitor_s": 1.5}]
    for s in range(1, last + 1):
        row = {"step": s, "epoch": s / steps_per_epoch, "loss": 1000.0 - s, "lr": 0.001, "samples_per_s": 50.0,
               "elapsed_s": s * 0.1}
        if s in evals:
            row.update(knn_k20=evals[s], knn_k200=evals[s] - 2, linear_top1=linear[s], monitor_s=1.5)
        rows.append(row)
    return pd.DataFrame(rows, columns=MONITOR_COLUMNS)


def test_monitor_curves_crossing_and_notes(tmp_path, figures):
    steps = [0, 100, 200, 300, 400]
    # random init's online kNN: 40. bt dips below it, then reaches it at step 300 (41 >= 40); step 0
    # equals it (random init's weights) and does not count. never stays below.
    bt = dict(zip(steps, [40.0, 35.0, 38.0, 41.0, 45.0]))
    never = dict(zip(steps, [40.0, 30.0, 32.0, 35.0, 39.9]))
    linear = dict(zip(steps, [10.0, 20.0, 30.0, 40.0, 50.0]))
    random_init = pd.DataFrame([{"step": 0, "epoch": 0.0, "knn_k20": 40.0, "knn_k200": 38.0, "linear_top1": 10.0,
                                 "monitor_s": 1.0}], columns=MONITOR_COLUMNS)
    runs = [_run(tmp_path, "bt", "barlow_twins", [50] * 6, knn=55.0, metrics=monitor_metrics(bt, linear)),
            _run(tmp_path, "never", "barlow_twins", [50] * 6, metrics=monitor_metrics(never, linear)),
            _run(tmp_path, "old", "barlow_twins", [50] * 6),  # six-column metrics.csv: no monitor curve
            _run(tmp_path, "rand", "random", [10] * 6, metrics=random_init)]
    report(runs, tmp_path / "out")
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert "- bt: resnet18, 3 pretraining epochs, probe protocol `fast`, 100 train / 50 val images; " \
           "online kNN crosses random init at step 300 (epoch 1.20)\n" in md  # 300 / 250 steps per epoch
    assert "never: resnet18, 3 pretraining epochs, probe protocol `fast`, 100 train / 50 val images; " \
           "online kNN stays below random init (40.00) through step 400\n" in md
    assert "- old: resnet18, 3 pretraining epochs, probe protocol `fast`, 100 train / 50 val images\n" in md
    df = pd.read_csv(tmp_path / "out" / "benchmark.csv").set_index("config")
    assert (df.loc["bt", "monitor_cross_step"], df.loc["bt", "monitor_cross_epoch"]) == (300, 1.2)
    assert pd.isna(df.loc["never", "monitor_cross_step"]) and df.loc["never", "monitor_random_knn"] == 40

    monitor = figures["monitor_curves.png"]
    (ax,) = [a for a in monitor["axes"] if a["title"]]  # the epoch axis on top is a child of this one
    assert ax["title"].startswith("fmnist")
    lines = {ln[0]: ln for ln in ax["lines"]}
    assert set(lines) == {"random init kNN", "fmnist/bt kNN k=20", "fmnist/bt online linear",
                          "fmnist/never kNN k=20 (does not cross random init)", "fmnist/never online linear",
                          "_crossing fmnist/bt"}
    assert lines["random init kNN"][2] == [40.0, 40.0]
    knn = lines["fmnist/bt kNN k=20"]
    assert (knn[1], knn[2], knn[3]) == (steps, [bt[s] for s in steps], "-")
    lin = lines["fmnist/bt online linear"]
    assert (lin[1], lin[2], lin[3]) == (steps, [linear[s] for s in steps], "--")
    assert lines["_crossing fmnist/bt"][1:3] == ([300], [41.0])
    assert ("crosses at step 300", (300, 41.0)) in ax["texts"]
    # in the PNG: the crossing star and bt's kNN line at step 400 in bt's colour; the random-init line at y=40
    pixel = monitor["pixel"]
    assert close(pixel(ax["ax"], 300, 41.0), rgb(knn[4]))
    assert close(pixel(ax["ax"], 350, 43.0), rgb(knn[4]))  # midway along the segment 300 -> 400
    along = [pixel(ax["ax"], x, 40.0) for x in np.linspace(10, 290, 141)]  # a dotted line: some gaps
    assert sum(close(p, rgb(lines["random init kNN"][4])) for p in along) > 20  # absent: 0

    # the loss curve skips the step-0 evaluation row, whose loss is empty
    loss = {ln[0]: ln for ln in figures["pretrain_curves.png"]["axes"][0]["lines"]}
    assert loss["fmnist/bt"][1][0] == 1 and len(loss["fmnist/bt"][1]) == 400
    assert not any(np.isnan(loss["fmnist/bt"][2]))


def test_unreadable_result_names_the_file(tmp_path):
    bad = tmp_path / "d" / "x" / "probes.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(BadInput, match=r"probes.json: unreadable probe result"):
        report([bad], tmp_path / "out")


def test_identity_comes_with_the_file_or_from_the_workflow_never_from_the_path(tmp_path):
    path = _run(tmp_path, "bt", "barlow_twins", [1, 2, 3, 4, 5, 6])
    blob = json.loads(path.read_text())
    moved = tmp_path / "elsewhere" / "any" / "probes.json"  # a folder that names nothing
    moved.parent.mkdir(parents=True)
    moved.write_text(json.dumps(blob))
    (path.parent / "metrics.csv").rename(moved.parent / "metrics.csv")
    assert list(report([moved], tmp_path / "out")[["dataset", "config"]].iloc[0]) == ["fmnist", "bt"]
    del blob["identity"]
    moved.write_text(json.dumps(blob))
    with pytest.raises(BadInput, match=r"probes.json: no identity .*\(snakemake --forcerun merge_probes\)"):
        report([moved], tmp_path / "out")
    rows = report([{"probes": str(moved), "dataset": "cifar", "experiment": "x", "seed": 4,
                    "metrics": str(moved.parent / "metrics.csv")}], tmp_path / "out2")
    assert list(rows[["dataset", "config", "seed"]].iloc[0]) == ["cifar", "x", 4]


def test_a_reference_run_is_drawn_and_noted_beside_the_table(tmp_path, figures):
    """A short run that never reaches random init, beside a committed long run that does (at step 300
    of its own curve, against its own random-init row): the note and the grey curve say where."""
    steps = [0, 100, 200, 300, 400]
    linear = dict(zip(steps, [10.0] * 5))
    random_init = pd.DataFrame([{"step": 0, "epoch": 0.0, "knn_k20": 40.0, "knn_k200": 38.0, "linear_top1": 10.0,
                                 "monitor_s": 1.0}], columns=MONITOR_COLUMNS)
    short = {0: 40.0, 100: 30.0, 200: 35.0}
    runs = [_run(tmp_path / "now", "bt", "barlow_twins", [50] * 6,
                 metrics=monitor_metrics(short, dict(zip(short, [10.0] * 3)), last=200)),
            _run(tmp_path / "now", "rand", "random", [10] * 6, metrics=random_init)]
    long_run = dict(zip(steps, [40.0, 30.0, 39.0, 42.0, 50.0]))
    reference = [_run(tmp_path / "ref", "long", "barlow_twins", [60] * 6, seed=1, metrics=monitor_metrics(long_run, linear)),
                 _run(tmp_path / "ref", "rand", "random", [10] * 6, metrics=random_init)]
    report(runs, tmp_path / "out", reference=reference)
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| long |" not in md and md.count("| bt |") == 1  # a reference is not a row
    assert "online kNN stays below random init (40.00) through step 200" in md
    assert (f"- reference (not a row of this table) `{reference[0].parent}`: 3 pretraining epochs; online kNN crosses "
            "random init at step 300 (epoch 1.20)") in md
    (ax,) = [a for a in figures["monitor_curves.png"]["axes"] if a["title"]]
    lines = {ln[0]: ln for ln in ax["lines"]}
    grey = lines[f"reference `{reference[0].parent}` kNN k=20"]
    assert (grey[1], grey[2]) == (steps, [long_run[s] for s in steps])
    assert lines["_reference crossing"][1:3] == ([300], [42.0])
    assert ("reference crosses at step 300", (300, 42.0)) in ax["texts"]
    # the panel is widened to the reference's crossing (step 300), past the short run's last step (200),
    # and the grey star is in the PNG there
    assert ax["ax"].get_xlim()[1] >= 300
    assert close(figures["monitor_curves.png"]["pixel"](ax["ax"], 300, 42.0), rgb(lines["_reference crossing"][4]))


def test_without_its_own_random_init_row_a_table_borrows_the_references(tmp_path, figures):
    """A run trained alone (no random-init row) is measured against the reference's random-init line."""
    random_init = pd.DataFrame([{"step": 0, "epoch": 0.0, "knn_k20": 40.0, "knn_k200": 38.0, "linear_top1": 10.0,
                                 "monitor_s": 1.0}], columns=MONITOR_COLUMNS)
    short = {0: 40.0, 100: 30.0, 200: 35.0}
    runs = [_run(tmp_path / "now", "bt", "barlow_twins", [50] * 6,
                 metrics=monitor_metrics(short, dict(zip(short, [10.0] * 3)), last=200))]
    long_run = {0: 40.0, 100: 30.0, 200: 39.0, 300: 42.0, 400: 50.0}
    reference = [_run(tmp_path / "ref", "long", "barlow_twins", [60] * 6, seed=1,
                      metrics=monitor_metrics(long_run, dict(zip(long_run, [10.0] * 5)))),
                 _run(tmp_path / "ref", "rand", "random", [10] * 6, metrics=random_init)]
    report(runs, tmp_path / "out", reference=reference)
    (ax,) = [a for a in figures["monitor_curves.png"]["axes"] if a["title"]]
    lines = {ln[0]: ln for ln in ax["lines"]}
    assert lines["random init kNN (the reference's row)"][2] == [40.0, 40.0]
    assert "fmnist/bt kNN k=20 (does not cross random init)" in lines
    assert lines["_reference crossing"][1:3] == ([300], [42.0])
    report(runs, tmp_path / "alone")  # no reference: no line, no crossing claimed
    (ax,) = [a for a in figures["monitor_curves.png"]["axes"] if a["title"]]
    assert {ln[0] for ln in ax["lines"]} == {"fmnist/bt kNN k=20", "fmnist/bt online linear"}


def _with_preset(path, preset, smoke=False):
    """The workflow's row (--runs-json): the file with its identity and its experiment's preset."""
    blob = json.loads(path.read_text())
    if smoke:
        blob["config"]["description"] = "SMOKE: a few steps"
        path.write_text(json.dumps(blob))
    return {"probes": str(path), **blob["identity"], "metrics": str(path.parent / "metrics.csv"), "preset": preset}


def test_published_row_and_delta_under_the_regenerated_row(tmp_path):
    """Three seeds of imagenet_r50_ep300 against MMSelfSup's 15.51 / 33.98 / 45.96 / 61.90 / 71.01 / 71.66, kNN 63.8
    (tests/test_published.py checks those against the upstream README). By hand, per column: seeds (a, b, c) ->
    mean, sample std, Δ = mean - published, within noise iff |Δ| <= 2 std:
    Feature1 15, 16, 17 -> 16, 1, +0.49, yes; AvgPool 60, 61, 62 -> 61, 1, -10.66, no; kNN 63.4, 63.6, 63.8 -> 63.6,
    0.2, -0.20, yes."""
    runs = [_with_preset(_run(tmp_path, "bt", "barlow_twins", [15 + s, 33.98, 45.96, 61.9, 71.01, 60 + s],
                                   seed=s, knn=63.4 + s / 5), "imagenet_r50_ep300") for s in (0, 1, 2)]
    runs += [_with_preset(_run(tmp_path, "smoke", "barlow_twins", [1, 2, 3, 4, 5, 6], knn=7.0), "imagenet_r50_ep300",
                          smoke=True),
             _with_preset(_run(tmp_path, "fast", "barlow_twins", [15.0, 34, 46, 62, 71, 71.0]),
                          "imagenet_r50_ep300_fastprobe"),
             _with_preset(_run(tmp_path, "c10", "barlow_twins", [5] * 6), "cifar10_r18_ep1000"),
             _with_preset(_run(tmp_path, "rand", "random", [5] * 6, metrics=None), "imagenet_r50_ep300")]
    report(runs, tmp_path / "out")
    md = (tmp_path / "out" / "benchmark.md").read_text()
    published = "| 15.51 | 33.98 | 45.96 | 61.90 | 71.01 | 71.66 | 63.8 |"
    bt = md.index("| bt | 16.00 ± 1.00 (3) |")
    lines = md[bt:].splitlines()
    assert lines[1] == f"| Published (MMSelfSup 0.x) {published}"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "Δ" and cells[1] == "+0.49 ≈ (n=3)" and cells[6] == "\u221210.66 > 2σ (n=3)"
    assert cells[7] == "\u22120.20 ≈ (n=3)"
    smoke = md[md.index("| smoke | 1.00 |"):].splitlines()
    assert smoke[1] == f"| Published (MMSelfSup 0.x) {published}"
    assert smoke[2] == "| Δ | \u221214.51 | \u221231.98 | \u221242.96 | \u221257.90 | \u221266.01 | \u221265.66 | \u221256.80 |"
    fast = md[md.index("| fast | 15.00 |"):].splitlines()
    assert fast[1] == f"| Published (MMSelfSup 0.x), for reference {published}" and fast[2].startswith("| Δ | \u22120.51 |")
    for plain in ("| c10 | 5.00 |", "| Random init (rand) | 5.00 |"):  # no published row under them
        assert not md[md.index(plain):].splitlines()[1].startswith("| Published")
    assert "- c10 vs published: no published numbers for cifar10_r18_ep1000\n" in md
    assert "- smoke vs published: SMOKE run: its Δ compares a few steps with the published run, not a result" in md
    assert ("open-mmlab/mmselfsup configs/selfsup/barlowtwins/README.md @ 684875d09b68ae654b1d3186190a993274dcc297"
            in md)
    assert "fast vs published: preset imagenet_r50_ep300_fastprobe: published row for reference, another probe" in md
    assert "the top-1 of its heads after the final epoch" in md and "rand vs published" not in md
    df = pd.read_csv(tmp_path / "out" / "benchmark.csv")
    mean = df[(df["config"] == "bt") & (df["seed"] == "mean")].iloc[0]
    assert mean["Feature1_published"] == 15.51 and mean["Feature1_delta"] == pytest.approx(0.49, abs=0.005)
    assert mean["Feature1_within_noise"] and not mean["AvgPool_within_noise"] and mean["kNN_published"] == 63.8
    assert mean["published_source"].endswith("@ 684875d09b68ae654b1d3186190a993274dcc297")
    seed0 = df[(df["config"] == "bt") & (df["seed"] == "0")].iloc[0]  # each seed's own Δ; noise only on the mean
    assert seed0["Feature1_delta"] == pytest.approx(-0.51, abs=0.005) and pd.isna(seed0["Feature1_within_noise"])
    for other in ("c10", "rand"):
        row = df[df["config"] == other].iloc[0]
        assert pd.isna(row["Feature1_published"]) and pd.isna(row["published_source"])
    assert df[df["config"] == "c10"].iloc[0]["preset"] == "cifar10_r18_ep1000"
    html = (tmp_path / "out" / "benchmark.html").read_text()
    assert "<th>Feature1_delta</th>" in html and "<td>0.49</td>" in html and "<th>published_source</th>" in html
