"""The published rows (barlow/published.yaml) against the upstream file's text, never against our own data.

Oracle: MMSelfSup v0.11.0 configs/selfsup/barlowtwins/README.md, its table lines transcribed verbatim in
tests/upstream/mmselfsup_v0.py (README_LINEAR_EVAL, README_KNN) with the commit.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest

from barlow import published
from barlow.config import preset_names
from tests.upstream import mmselfsup_v0 as up

REPRODUCE = ["imagenet_r50_ep300", "imagenet_r50_ep300_accu4"]
FOR_REFERENCE = ["imagenet_r50_ep300_fastprobe", "imagenet_r50_ep300_exact"]
NONE = ["fmnist_r18", "fmnist_r18_long", "cifar10_r18_ep1000", "cifar100_r18_ep1000", "imagenet100_r18_ep1000"]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _upstream_row(lines: list[str]) -> tuple[str, dict[str, str]]:
    """(the config named in the row's link text, header -> cell) of a transcribed markdown table."""
    header, rule, row = (_cells(x) for x in lines)
    assert set("".join(rule)) <= {"-"}
    model = row[0].split("]")[0].lstrip("[")
    return model, dict(zip(header[1:], row[1:]))


def test_imagenet_rows_are_the_upstream_readme_cells():
    model, linear = _upstream_row(up.README_LINEAR_EVAL)
    knn_model, knn = _upstream_row(up.README_KNN)
    assert model == knn_model == "barlowtwins_resnet50_8xb256-coslr-300e_in1k"
    expected = {**linear, "kNN": knn["k=20"]}  # our kNN column is k=20 (barlow/knn.py), as its test_knn.py's T=0.07
    assert list(linear) == ["Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool"]
    for preset in REPRODUCE + FOR_REFERENCE:
        pub = published.for_preset(preset)
        assert pub["top1"] == expected, preset
        assert (pub["repository"], pub["path"], pub["commit"], pub["model"]) == (
            "open-mmlab/mmselfsup", up.BARLOWTWINS_README, up.MMSELFSUP_V0_COMMIT, model)
        assert pub["relation"] == ("reproduces" if preset in REPRODUCE else "reference")
    assert published.for_preset("imagenet_r50_ep300_fastprobe")["differs"].startswith("another probe protocol")


def test_every_preset_is_listed_and_the_others_have_no_published_numbers():
    assert sorted(published.presets()) == sorted(preset_names())
    for preset in NONE:
        assert published.presets()[preset] is None and published.for_preset(preset) is None
    assert published.for_preset("not_a_preset") is None and published.for_preset(None) is None


def test_delta_and_noise_by_hand():
    # seeds 15, 16, 17: mean 16, sample std 1; 16 - 15.51 = +0.49 <= 2 -> within noise
    c = published.compare(pd.Series([15.0, 16.0, 17.0]), "15.51")
    assert c["delta"] == pytest.approx(0.49) and c["std"] == pytest.approx(1.0) and c["n"] == 3 and c["within_noise"]
    assert published.delta_cell(c) == "+0.49 ≈ (n=3)"
    # seeds 60, 61, 62 against 71.66: Δ = -10.66, |Δ| > 2 * 1
    c = published.compare(pd.Series([60.0, 61.0, 62.0]), "71.66")
    assert not c["within_noise"] and published.delta_cell(c) == "\u221210.66 > 2σ (n=3)"
    # one run: Δ, no noise estimate
    c = published.compare(pd.Series([71.0]), "71.66")
    assert c["within_noise"] is None and math.isnan(c["std"]) and published.delta_cell(c) == "\u22120.66"
    assert published.compare(pd.Series([float("nan")]), "1.0") is None and published.compare(pd.Series([1.0]), None) is None
