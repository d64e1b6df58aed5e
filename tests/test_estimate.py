"""barlow.estimate against independent back-of-envelope figures, and the `estimate` CLI.

Back-of-envelope for ImageNet ResNet-50 pretraining: ResNet-50 is "4.1 GFLOPs" per 224 px image
forward in papers, which counts multiply-accumulates, i.e. 8.2 GFLOP in the FLOP/s unit of a GPU.
Training = forward + backward ~ 3 x forward, for 2 views:
    300 epochs x 1,281,167 images x 2 views x 3 x 8.2e9 = 1.891e19 FLOP.
The estimate also counts the 8192-d projector (0.302 GFLOP/view forward, +3.7 %) and the loss's
8192 x 8192 cross-correlation (+0.8 %), and drops the last partial batch of each epoch (-0.02 %),
so it must lie within 1.00-1.10 x the envelope; we allow 0.97-1.15 (the "4.1" is rounded). Memory
expectations (the tests at the end) are written out as the hand arithmetic they come from. Each usual
bug lands far outside: MACs taken as FLOPs (x0.5), one view (x0.5), no backward (x0.33), per-GPU
instead of global batch in the step count (x8).
"""
from __future__ import annotations

import io
import math

import pytest

from barlow.config import resolve
from barlow.estimate import estimate, model_costs, print_estimate
from tests.conftest import run_cli

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
R50_FWD = 2 * 4.1e9  # FLOP per 224 px image (4.1 GMAC)


def _rows(preset: str, **kw) -> dict:
    return {r["stage"]: r for r in estimate(resolve(preset), **kw)}


def test_flop_counts_of_the_real_models():
    c = model_costs("resnet50", 224, (8192, 8192, 8192), True)
    assert c["backbone"] == pytest.approx(R50_FWD, rel=0.01)  # torchvision: 4.09 GMAC
    # projector: 2 FLOP per multiply-accumulate of 2048x8192 + 2 x 8192x8192 (biases ignored)
    assert c["projector"] == pytest.approx(2 * (2048 * 8192 + 2 * 8192 * 8192), rel=1e-3)
    assert c["dims"] == {"feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216,
                         "feature5": 8192, "avgpool": 2048}


def test_pretrain_estimate_matches_the_back_of_envelope():
    rows = _rows("imagenet_r50_ep300")
    pre = rows["pretrain"]
    assert pre["steps"] == 300 * (IMAGENET_TRAIN // 2048) == 187_500
    envelope = 300 * IMAGENET_TRAIN * 2 * 3 * R50_FWD
    assert 0.97 < pre["flops"] / envelope < 1.15
    full_rate = pre["flops"] / (150e12 * 3600)  # mixed precision at the full 150 TFLOP/s
    fp32 = resolve("imagenet_r50_ep300")["pretrain"]["precision"] == "fp32"
    assert pre["gpu_hours"] == pytest.approx(full_rate / (0.5 if fp32 else 1.0))  # fp32 (TF32): half rate
    assert pre["wall_hours"] == pytest.approx(pre["gpu_hours"] / 8)
    assert 30 < full_rate < 40  # 1.89e19-2.2e19 FLOP / 150 TFLOP/s
    # Accumulation changes neither the samples nor the steps.
    accu = _rows("imagenet_r50_ep300_accu4")["pretrain"]
    assert (accu["steps"], accu["flops"]) == (pre["steps"], pre["flops"])


def test_probe_estimates():
    rows = _rows("imagenet_r50_ep300")
    five, avg = rows["probe:five_feature"], rows["probe:avgpool"]
    assert five["steps"] == 90 * (IMAGENET_TRAIN // 256) and avg["steps"] == 100 * (IMAGENET_TRAIN // 256)
    # Frozen forward every epoch + val, heads small (5 heads: ~3 % of the forward); fp32 at half rate.
    for r, epochs in ((five, 90), (avg, 100)):
        envelope = (epochs * IMAGENET_TRAIN + IMAGENET_VAL) * R50_FWD
        assert 0.97 < r["flops"] / envelope < 1.1
        assert r["gpu_hours"] == pytest.approx(r["flops"] / (0.5 * 150e12 * 3600))
    # The single pass runs the backbone for 100 epochs instead of 90 + 100.
    fast = _rows("imagenet_r50_ep300_fastprobe")
    assert [k for k in fast if k.startswith("probe:")] == ["probe:all_heads"]
    ratio = fast["probe:all_heads"]["flops"] / (five["flops"] + avg["flops"])
    assert ratio == pytest.approx(100 / 190, rel=0.05)
    total = rows["total"]
    assert total["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for k, r in rows.items() if k != "total"))


def test_consistent_with_the_official_cost():
    """Official Barlow Twins: 1000 epochs took ~2.7k-4k V100-hours.

    The estimate is the compute-bound floor. By hand, 1000 epochs are 1000 x 1,281,167 images x 2 views
    x 3 (forward + backward) x 8.2 GFLOP = 6.30e19 FLOP (+ projector and loss, as above: 0.97-1.15), and
    at V100 rates of 30 and 60 TFLOP/s, fp32 at half rate, that is 1,167 and 584 GPU-hours: below the
    official 2.7k, as a floor must be. The same count at the V100's fp32 peak (15.7 TFLOP/s) fits
    inside those 2.7k hours, so the official figure does not contradict the count either.
    """
    cfg = resolve("imagenet_r50_ep300", {"pretrain": {"epochs": 1000}})
    envelope = 1000 * IMAGENET_TRAIN * 2 * 3 * R50_FWD
    assert envelope == pytest.approx(6.30e19, rel=1e-3)
    for tflops, hand_hours in ((30.0, 1167.3), (60.0, 583.6)):
        pre = {r["stage"]: r for r in estimate(cfg, gpu_tflops=tflops)}["pretrain"]
        assert 0.97 < pre["flops"] / envelope < 1.15
        assert envelope / (0.5 * tflops * 1e12 * 3600) == pytest.approx(hand_hours, rel=1e-3)
        assert 0.97 < pre["gpu_hours"] / hand_hours < 1.15
        assert pre["gpu_hours"] < 2700, tflops
    assert envelope / (15.7e12 * 3600) < 2700


def test_default_image_counts_and_override():
    rows = _rows("imagenet_r50_ep300")
    assert rows["convert"]["images"] == IMAGENET_TRAIN + IMAGENET_VAL
    assert rows["convert"]["cpu_hours"] == pytest.approx((IMAGENET_TRAIN + IMAGENET_VAL) / 100 / 3600)
    fm = _rows("fmnist_r18")
    assert fm["convert"]["images"] == 60_000 + 10_000
    assert fm["pretrain"]["steps"] == 2 * (60_000 // 128)  # fmnist_r18: 2 epochs, batch 128 (936 steps, as the default run logs)
    small = _rows("fmnist_r18", images=1000)
    assert small["convert"]["images"] == 1000 + 10_000
    assert small["pretrain"]["steps"] == 2 * (1000 // 128)
    buf = io.StringIO()
    print_estimate(resolve("fmnist_r18"), file=buf)
    assert "60,000 train / 10,000 val" in buf.getvalue()


def test_cli_prints_every_stage():
    r = run_cli("estimate", "--preset", "imagenet_r50_ep300", timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for stage in ("convert", "pretrain", "probe:five_feature", "probe:avgpool", "total"):
        assert f"\n{stage} " in out, stage
    assert "1,281,167 train / 50,000 val" in out and "GPU-h" in out and "187,500" in out


# ---- memory: expectations computed by hand -------------------------------------------------------
GIB = 2**30
R50_DIMS = {"feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216, "feature5": 8192, "avgpool": 2048}
FIVE = 9216 + 9216 + 8192 + 9216 + 8192  # 44,032
# FFCV batch buffers per task: (3 batches ahead + 2) x batch x 3 x 224 x 224 uint8
LOADER_256 = 5 * 256 * 3 * 224 * 224 / GIB


def _cached(preset: str) -> dict:
    cfg = resolve(preset)
    for p in cfg["probe"]["passes"]:
        p["cached"] = True
    return cfg


def test_cached_probe_host_memory_by_hand():
    from barlow.estimate import probe_memory_gb

    assert FIVE == 44_032 and sum(R50_DIMS.values()) == 46_080
    cfg = _cached("imagenet_r50_ep300")
    # One task: every train + val image x 44,032 float16 features (the five-feature pass is the larger).
    feats = (1_281_167 + 50_000) * 44_032 * 2 / GIB  # 117.2 GB (GiB); the fp32 cache would be twice that
    assert probe_memory_gb(cfg, IMAGENET_TRAIN, IMAGENET_VAL) == pytest.approx(4 + LOADER_256 + feats)
    # 2 nodes x 4 tasks: each task holds an eighth (rounded up) and a 32-image batch; a node holds 4 tasks.
    share = (math.ceil(1_281_167 / 8) + math.ceil(50_000 / 8)) * 44_032 * 2 / GIB
    loader_32 = 5 * 32 * 3 * 224 * 224 / GIB
    assert probe_memory_gb(cfg, IMAGENET_TRAIN, IMAGENET_VAL, nodes=2, tasks_per_node=4) == \
        pytest.approx(4 * (4 + loader_32 + share))
    # All six heads cached in one pass: 1,331,167 x 46,080 x 2 bytes = 122.7e9 bytes (the "~123 GB").
    fast = _cached("imagenet_r50_ep300_fastprobe")
    assert (1_331_167 * 46_080 * 2) / 1e9 == pytest.approx(122.68, abs=0.01)
    assert probe_memory_gb(fast, IMAGENET_TRAIN, IMAGENET_VAL) == pytest.approx(
        4 + LOADER_256 + 1_331_167 * 46_080 * 2 / GIB)
    # Uncached passes hold no features: process + loader only.
    assert probe_memory_gb(resolve("imagenet_r50_ep300"), IMAGENET_TRAIN, IMAGENET_VAL) == pytest.approx(4 + LOADER_256)


def test_probe_wall_clock_divides_by_the_probes_own_tasks():
    one = _rows("imagenet_r50_ep300", probe_gpus=1)
    eight = _rows("imagenet_r50_ep300", probe_gpus=8)
    for stage in ("probe:five_feature", "probe:avgpool"):
        assert one[stage]["gpu_hours"] == eight[stage]["gpu_hours"]  # the work does not change
        assert one[stage]["wall_hours"] == pytest.approx(one[stage]["gpu_hours"])  # one task: wall = work
        assert eight[stage]["wall_hours"] == pytest.approx(eight[stage]["gpu_hours"] / 8)
    assert one["pretrain"]["wall_hours"] == pytest.approx(one["pretrain"]["gpu_hours"] / 8)  # --gpus 8


def test_stage_memory_by_hand():
    from barlow.estimate import model_memory

    # ResNet-50 without fc: 25,557,032 - (2048 x 1000 + 1000) = 23,508,032 parameters.
    # Projector: 2048x8192 + 8192 (Linear) + 2 x 8192 (BN) + 8192x8192 + 8192 + 2 x 8192 + 8192x8192 (no bias).
    proj = 2048 * 8192 + 8192 + 2 * 8192 + 8192 * 8192 + 8192 + 2 * 8192 + 8192 * 8192
    assert proj == 151_044_096
    assert model_memory("resnet50", 224, (8192, 8192, 8192), True)["projector"] == proj
    assert model_memory("resnet50", 224, (8192, 8192, 8192), False)["projector"] == proj - 2 * 8192  # no biases
    bias = resolve("imagenet_r50_ep300")["model"].get("projector_bias", True)
    mm = model_memory("resnet50", 224, (8192, 8192, 8192), bias)
    proj = proj if bias else proj - 2 * 8192
    assert mm["backbone"] == 23_508_032
    # Saved activations per 224 px image, fp32: ResNet-50's published ~100 MB (feature maps saved by
    # conv, BN and ReLU), counted here as an upper bound (an in-place ReLU's output counted twice).
    assert 80e6 < mm["train_bytes"] < 200e6
    rows = _rows("imagenet_r50_ep300")
    pre = rows["pretrain"]
    params = 23_508_032 + proj
    fp32 = resolve("imagenet_r50_ep300")["pretrain"]["precision"] == "fp32"
    act = 256 * 2 * mm["train_bytes"] * (1 if fp32 else 0.5)  # 2048 / 8 GPUs per GPU, 2 views
    state = params * (12 if fp32 else 14)  # weights + grads + LARS momentum (+ fp16 copies under amp)
    assert pre["gpu_gb"] == pytest.approx((state + act + 4 * 8192**2 * 4) / GIB + 2)
    # Host per node: 8 tasks x (4 GB + 2-view loader buffers + the checkpoint, 8 bytes per parameter).
    assert pre["host_gb"] == pytest.approx(8 * (4 + 2 * LOADER_256 + params * 8 / GIB))  # 256 images/GPU
    assert pre["cache_gb"] == pytest.approx(202e9 / GIB)  # FFCV's ImageNet, 512 px, Mix, quality 90
    assert pre["cpus"] == resolve("imagenet_r50_ep300")["pretrain"]["workers"] + 1
    five = rows["probe:five_feature"]
    assert five["cache_gb"] == pytest.approx((202e9 + 202e9 * 50_000 / 1_281_167) / GIB)
    # Frozen fp32 backbone + five heads (44,032 x 1000 weights + 5 x 1000 biases) with grads and momentum,
    # plus 32 images per GPU of inference activations and pooled features (+ grads).
    heads = (FIVE + 5) * 1000
    expect = (23_508_032 * 4 + heads * 12 + 32 * (mm["infer_bytes"] + 3 * FIVE * 4)) / GIB + 2
    assert five["gpu_gb"] == pytest.approx(expect)


def test_cli_prints_memory_table():
    buf = io.StringIO()
    print_estimate(resolve("imagenet_r50_ep300"), file=buf)
    out = buf.getvalue()
    assert "GPU GB/GPU" in out and "host GB/node" in out and "page cache GB/node" in out and "CPUs/task" in out
