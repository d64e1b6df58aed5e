"""The fine-tune's rows of barlow.estimate by hand count (barlow/estimate_finetune.py's formula)."""
from __future__ import annotations

import io

import pytest

from barlow.config import resolve
from barlow.estimate import estimate
from barlow.estimate_costs import costs_of
from barlow.estimate_report import print_estimate

R50_FWD = 2 * 4.1e9  # FLOP per 224 px image (4.1 GMAC)


def _rows(cfg, **kw) -> dict:
    return {r["stage"]: r for r in estimate(cfg, **kw)}


def test_imagenet_fine_tunes_by_hand():
    rows = _rows(resolve("imagenet_r50_ep300"), finetune=True)
    one, ten = rows["finetune:1%"], rows["finetune:10%"]
    # SimCLR's lists: 12,811 and 128,116 images; batch 256 drops 11 and 116 of them every epoch
    assert (one["images"], ten["images"]) == (12_811, 128_116)
    assert (one["steps"], ten["steps"]) == (20 * 50, 20 * 500)
    head = 2 * 2048 * 1000  # Linear(2048 -> 1000) forward
    fwd = costs_of(resolve("imagenet_r50_ep300"))["backbone"]
    assert fwd == pytest.approx(R50_FWD, rel=0.01)
    # 20 epochs x (train: 3 x 12,800 images + val: 50,000 images, forward each)
    assert one["flops"] == pytest.approx(20 * (fwd + head) * (3 * 12_800 + 50_000))
    assert ten["flops"] == pytest.approx(20 * (fwd + head) * (3 * 128_000 + 50_000))
    # fp32 at half of 150 TFLOP/s, on the probes' 8 GPUs
    assert one["gpu_hours"] == pytest.approx(one["flops"] / (75e12 * 3600))
    assert ten["wall_hours"] == pytest.approx(ten["gpu_hours"] / 8)
    assert rows["total"]["flops"] == pytest.approx(sum(r["flops"] for k, r in rows.items() if k != "total"))


def test_balanced_subsets_elsewhere_and_none_unless_asked():
    cfg = resolve("fmnist_r18")
    assert not [k for k in _rows(cfg) if k.startswith("finetune")]  # no finetune section, not asked
    rows = _rows({**cfg, "finetune": {"fractions": [1, 10], "epochs": 5, "batch_size": 128}})
    one = rows["finetune:1%"]
    assert (one["images"], one["steps"], rows["finetune:10%"]["images"]) == (600, 5 * 4, 6000)
    fwd = costs_of(cfg)["backbone"]
    assert one["flops"] == pytest.approx(5 * (fwd + 2 * 512 * 10) * (3 * 512 + 10_000))


def test_cli_table_lists_the_fine_tunes():
    out = io.StringIO()
    print_estimate(resolve("imagenet_r50_ep300"), file=out, finetune=True)
    text = out.getvalue()
    assert "finetune:1%" in text and "finetune:10%" in text and "12,811 labelled images" in text
