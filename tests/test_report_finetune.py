"""The fine-tune columns of the report (barlow/report_finetune.py), from hand-written result files: the table
gets FT<p>% top-1 / top-5 (the final epoch) only when some row has them, the CSV the best-on-val figures under
their own names, seeds a mean ± std."""
import json

import pandas as pd

from barlow.report import report
from tests.test_report import _run

HEADER = "| config | Feature1 | Feature2 | Feature3 | Feature4 | Feature5 | AvgPool | kNN |"


def _finetune(probes, percent, top1, top5, best1, best5):
    """A finetune/<p>pc.json beside ``probes`` as barlow/finetune.py writes it (the fields the report reads)."""
    d = probes.parent / "finetune"
    d.mkdir(exist_ok=True)
    path = d / f"{percent:g}pc.json"
    path.write_text(json.dumps({
        "protocol": "finetune", "percent": percent, "method": "balanced", "top1": top1, "top5": top5,
        "epochs": 20, "epoch_reported": 20, "reported": "final epoch", "train_images": 600 * percent,
        "best_on_val": {"top1": best1, "top5": best5, "epoch_top1": 12}, "subset_sha256": f"sha{percent}",
        "finetune_wall_s": 9.5, "finetune_commit": "def456"}))
    return str(path)


def _row(md: str, label: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_table_without_finetunes_is_unchanged(tmp_path):
    report([_run(tmp_path, "bt", "barlow_twins", [10, 20, 30, 40, 50, 60], knn=55.0)], out_dir=tmp_path / "out")
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert HEADER + "\n|---|---|---|---|---|---|---|---|\n" in md and "FT" not in md
    assert not [c for c in pd.read_csv(tmp_path / "out" / "benchmark.csv").columns if c.startswith("ft")]


def test_finetune_columns_from_the_json_files(tmp_path):
    bt = _run(tmp_path, "bt", "barlow_twins", [10, 20, 30, 40, 50, 60], knn=55.0)
    rnd = _run(tmp_path, "random", "random", [11, 21, 31, 41, 51, 61], knn=50.0)
    ft = [_finetune(bt, 1, 70.25, 97.5, 71.0, 98.0), _finetune(bt, 10, 85.0, 99.25, 85.5, 99.5)]
    runs = [{"probes": str(bt), "dataset": "fmnist", "experiment": "bt", "seed": None, "finetune": ft,
             "metrics": str(bt.parent / "metrics.csv")},
            {"probes": str(rnd), "dataset": "fmnist", "experiment": "random", "seed": None,
             "metrics": str(rnd.parent / "metrics.csv")}]
    report(runs, out_dir=tmp_path / "out")
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert HEADER + " FT1% top-1 | FT1% top-5 | FT10% top-1 | FT10% top-5 |" in md
    assert _row(md, "bt")[-4:] == ["70.25", "97.50", "85.00", "99.25"]  # the final epoch's, not the best on val
    assert _row(md, "Random init (random)")[-4:] == ["", "", "", ""]  # no fine-tune: empty cells
    assert "FINAL epoch" in md and "best epoch on val: 71.00/98.00" in md and "600 train images (balanced" in md
    csv = pd.read_csv(tmp_path / "out" / "benchmark.csv").set_index("config")
    assert csv.loc["bt", ["ft1_top1", "ft1_top5", "ft10_top1", "ft10_top5"]].tolist() == [70.25, 97.5, 85.0, 99.25]
    assert csv.loc["bt", ["ft1_best_on_val_top1", "ft1_best_on_val_top5"]].tolist() == [71.0, 98.0]
    assert (csv.loc["bt", "ft10_method"], csv.loc["bt", "ft10_subset_sha256"]) == ("balanced", "sha10")
    assert csv.loc["bt", "ft10_train_images"] == 6000 and csv.loc["bt", "ft1_commit"] == "def456"
    assert pd.isna(csv.loc["random", "ft1_top1"])


def test_a_probes_json_given_alone_takes_the_finetunes_beside_it_and_seeds_average(tmp_path):
    paths = []
    for seed, top1 in ((1, 70.0), (2, 72.0)):
        p = _run(tmp_path, "bt", "barlow_twins", [10, 20, 30, 40, 50, 60], seed=seed, knn=55.0)
        _finetune(p, 1, top1, 97.0, top1 + 1, 98.0)
        paths.append(p)
    report(paths, out_dir=tmp_path / "out")
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert _row(md, "bt")[-2:] == ["71.00 ± 1.41 (2)", "97.00 ± 0.00 (2)"]
    csv = pd.read_csv(tmp_path / "out" / "benchmark.csv")
    mean = csv[csv["seed"].astype(str) == "mean"].iloc[0]
    assert (mean["ft1_top1"], round(mean["ft1_top1_std"], 2)) == (71.0, 1.41)
