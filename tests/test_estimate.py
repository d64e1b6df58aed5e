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
import re

import pytest

from barlow.config import resolve
from barlow.estimate import estimate
from barlow.estimate_costs import model_costs
from barlow.estimate_report import print_estimate
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
    # ImageNet's images are not on this machine: the page cache is the documented fallback, and says so
    assert "train .beton: 317.42 GiB (340.82 GB), 1,281,167 images: assumed, not measured" in out
    assert "--dataset <name>" in out
    # issue 22 item 4: the monitor at <= 2 % of pretraining, even where the loader bounds it
    share = re.search(r"monitor: 75 evaluations .*: ([\d.]+) % of pretraining compute \(at most ([\d.]+) %", out)
    assert share and float(share.group(1)) <= 2 and float(share.group(2)) <= 2, out[-1500:]


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
    from barlow.estimate_memory import probe_memory_gb

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


# ResNet-50 without fc: torchvision's published 25,557,032 - (2048 x 1000 + 1000) = 23,508,032 parameters.
R50_PARAMS = 25_557_032 - (2048 * 1000 + 1000)
# Projector 2048-8192-8192-8192: 2048x8192 + 8192 (Linear) + 2 x 8192 (BN) + 8192x8192 + 8192 + 2 x 8192 + 8192x8192
# (last Linear without bias); projector_bias False drops the two hidden Linear biases.
R50_PROJ = 2048 * 8192 + 8192 + 2 * 8192 + 8192 * 8192 + 8192 + 2 * 8192 + 8192 * 8192


def r50_saved_elements() -> tuple[int, int]:
    """Per 224 px image, fp32 elements autograd saves for ResNet-50 (torchvision v1.5: stride on the 3x3) +
    the 2048-8192-8192-8192 projector, counted op by op from the architecture (maxpool's int64 indices count
    as 2). Conv saves its input, BN (train) its input, ReLU (in place) its output, Linear its input,
    maxpool its input and indices; the residual add_ and the 1x1 adaptive average (a mean) save nothing.
    Returns (distinct: each tensor once, what autograd really holds; per_op: a tensor saved by two ops
    counted twice, the in-place ReLU's output that the next conv / maxpool / Linear also saves)."""
    stem = 64 * 112 * 112
    distinct = 3 * 224 * 224 + stem + stem + 2 * 64 * 56 * 56 + 64 * 56 * 56  # image, bn1 in, relu out, indices, pool out
    per_op = 3 * 224 * 224 + stem + stem + stem + 2 * 64 * 56 * 56  # + maxpool's input (the relu's output)
    c_in, hw = 64, 56
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            h = hw // (stride if b == 0 else 1)
            x = c_in * hw * hw  # the block's input: the previous ReLU's output (or the maxpool's)
            a1, a2, a3 = width * hw * hw, width * h * h, 4 * width * h * h  # conv1, conv2, conv3 outputs
            # distinct: bn1 in + relu1 out, bn2 in + relu2 out, bn3 in + relu3 out (+ downsample bn in)
            distinct += 2 * a1 + 2 * a2 + 2 * a3 + (a3 if b == 0 else 0)
            # per op: conv1 in, bn1 in, relu1 out, conv2 in, bn2 in, relu2 out, conv3 in, bn3 in, relu3 out
            # (+ downsample conv in, bn in)
            per_op += x + 3 * a1 + 3 * a2 + 2 * a3 + ((x + a3) if b == 0 else 0)
            c_in, hw = 4 * width, h
    distinct += 2048 + 2 * 2 * 8192  # Linear1 in; per hidden layer bn in + relu out
    per_op += 2048 + 2 * 3 * 8192  # Linear1 in; per hidden layer bn in, relu out, next Linear in
    return distinct, per_op


R50_SAVED, R50_SAVED_PER_OP = (4 * n for n in r50_saved_elements())  # bytes per image, fp32
# Largest leaf layer of the frozen ResNet-50 at 224 px: bn1 (or the in-place ReLU), 64x112x112 in + out, fp32
R50_INFER_PEAK = 4 * (64 * 112 * 112 + 64 * 112 * 112)


def test_resnet50_saved_activations_by_hand_and_measured():
    """The hand count against autograd's saved tensors of a real forward (CPU, train mode, batches 3 and 2,
    each storage once, parameters left out): one image's difference."""
    import torch

    from barlow.model import backbone, projector

    assert (R50_SAVED, R50_SAVED_PER_OP) == (86_040_576, 130_562_048)
    net, proj = backbone("resnet50").train(), projector(2048, [8192] * 3, False).train()
    params = {p.untyped_storage().data_ptr() for m in (net, proj) for p in m.parameters()}

    def saved(batch: int) -> int:
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            proj(net(torch.randn(batch, 3, 224, 224)))
        return sum(storages.values())

    assert saved(3) - saved(2) == R50_SAVED


def test_stage_memory_by_hand():
    from barlow.estimate_costs import model_memory

    assert R50_PARAMS == 23_508_032 and R50_PROJ == 151_044_096
    cfg = resolve("imagenet_r50_ep300")
    assert cfg["model"]["projector_bias"] is False and cfg["pretrain"]["precision"] == "fp32"
    proj = R50_PROJ - 2 * 8192  # no hidden biases
    assert model_memory("resnet50", 224, (8192, 8192, 8192), True)["projector"] == R50_PROJ
    mm = model_memory("resnet50", 224, (8192, 8192, 8192), False)
    assert (mm["backbone"], mm["projector"]) == (R50_PARAMS, proj)
    # Saved activations: the estimate counts a tensor once per op that saves it (barlow/estimate.py: "an
    # upper bound (~1.5x)"): exactly the per-op hand count, 1.52 x what autograd really holds.
    assert mm["train_bytes"] == R50_SAVED_PER_OP
    assert 1.5 < mm["train_bytes"] / R50_SAVED < 1.55
    assert mm["infer_bytes"] == 2 * R50_INFER_PEAK == 12_845_056  # 2 x the largest layer's input + output
    rows = _rows("imagenet_r50_ep300")
    pre = rows["pretrain"]
    params = R50_PARAMS + proj
    state = params * 12  # fp32 weights + grads + LARS momentum

    def act(per_image):  # 2048 / 8 GPUs = 256 images per GPU, 2 views, fp32
        return 256 * 2 * per_image

    # Host per node: 8 tasks x (4 GB + 2-view loader buffers at 256 images/GPU + the monitor's 1-view loader
    # (batch 256) + 64 bytes of FFCV tables per image in each of 3 loaders + the checkpoint, 8 bytes per parameter).
    tables = 3 * 1_281_167 * 64 / GIB
    assert pre["host_gb"] == pytest.approx(8 * (4 + 2 * LOADER_256 + LOADER_256 + tables + params * 8 / GIB))
    # page cache: FFCV's ImageNet table at 512 px, p 0.5: 0.5 x 65.47 GB (JPEG q90) + 0.5 x 616.18 GB (RAW)
    assert pre["cache_gb"] == pytest.approx(340.825e9 / GIB)
    assert pre["mem_gb"] == pytest.approx(pre["host_gb"] + 340.825e9 / GIB)
    assert pre["cpus"] == cfg["pretrain"]["workers"] + 1
    # GPU: + the loss's 8192 x 8192 cross-correlation and its gradient (4 D^2 fp32), the monitor's 60,000
    # gathered 2048-d fp32 features (and their stacked copy) + one kNN chunk, + 2 GB CUDA reserve
    monitor = (2 * 60_000 * 2048 + 1024 * 50_000) * 4
    rest = state + 4 * 8192**2 * 4 + monitor
    assert pre["gpu_gb"] == pytest.approx((rest + act(130_562_048)) / GIB + 2)
    assert pre["gpu_gb"] - ((rest + act(R50_SAVED)) / GIB + 2) == pytest.approx(act(44_521_472) / GIB)  # 21.2 GB over
    five = rows["probe:five_feature"]
    assert five["cache_gb"] == pytest.approx(340.825e9 * (1 + 50_000 / 1_281_167) / GIB)
    # Frozen fp32 backbone + five heads (44,032 x 1000 weights + 5 x 1000 biases) with grads and momentum,
    # plus 32 images per GPU of inference activations and pooled features (+ grads).
    heads = (FIVE + 5) * 1000
    expect = (23_508_032 * 4 + heads * 12 + 32 * (12_845_056 + 3 * FIVE * 4)) / GIB + 2
    assert five["gpu_gb"] == pytest.approx(expect)


def test_cli_prints_memory_table():
    buf = io.StringIO()
    print_estimate(resolve("imagenet_r50_ep300"), file=buf)
    out = buf.getvalue()
    assert "GPU GB/GPU" in out and "host GB/node" in out and "page cache GB/node" in out and "CPUs/task" in out


# ---- pretraining's host memory and the page cache (issue 22 item 6) --------------------------------
def test_pretrain_memory_by_hand():
    from barlow.ffcv_import import import_ffcv

    from barlow.estimate_memory import FFCV_TABLE_BYTES, pretrain_memory_gb

    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import ALLOC_TABLE_TYPE, get_metadata_type

    # FFCV's own types: metadata of (image, label) + one allocation entry, + the index and order arrays
    assert get_metadata_type([RGBImageField(), IntField()]).itemsize + ALLOC_TABLE_TYPE.itemsize + 8 + 8 \
        == FFCV_TABLE_BYTES == 64
    cfg = resolve("imagenet_r50_ep300")
    params = R50_PARAMS + R50_PROJ - 2 * 8192  # projector_bias False
    # 2 nodes x 4 tasks: a task's micro-batch is 2048 / 8 = 256 (2 views); the monitor's loader 256 (1 view);
    # LARS: fp32 weights + momentum = 8 bytes a parameter; the 340 GB file once per node.
    per_task = 4 + 2 * LOADER_256 + LOADER_256 + 3 * 1_281_167 * 64 / GIB + params * 8 / GIB
    beton = 340_825_000_000
    got = pretrain_memory_gb(cfg, IMAGENET_TRAIN, nodes=2, tasks_per_node=4, beton_bytes=beton)
    assert got == pytest.approx(4 * per_task + beton / GIB)
    # accumulation 4 (accu4 preset: 8 x 64 x 4): the loader holds a 64-image micro-batch
    accu = resolve("imagenet_r50_ep300_accu4")
    assert pretrain_memory_gb(accu, IMAGENET_TRAIN, nodes=1, tasks_per_node=8) == pytest.approx(
        8 * (per_task - 2 * LOADER_256 + 2 * LOADER_256 / 4))
    # AdamW keeps two moments: 12 bytes a parameter; no monitor: one loader's tables, no monitor buffers
    fm = resolve("fmnist_r18", {"pretrain": {"monitor": {"enabled": False}}})
    assert (fm["model"]["arch"], fm["model"]["projector"], fm["model"]["projector_bias"]) == \
        ("resnet18", [1024] * 3, True)
    # ResNet-18 without fc: torchvision's 11,689,512 - (512 x 1000 + 1000); projector 512-1024-1024-1024 as above
    fm_params = 11_689_512 - (512 * 1000 + 1000) + 512 * 1024 + 1024 + 2 * 1024 + 1024 * 1024 + 1024 + 2 * 1024 \
        + 1024 * 1024
    loader = 5 * 128 * 2 * 3 * 32 * 32 / GIB
    assert pretrain_memory_gb(fm, 60_000) == pytest.approx(4 + loader + 60_000 * 64 / GIB + fm_params * 12 / GIB)


def test_page_cache_shortfall_says_so_in_one_line():
    from barlow.estimate_memory import page_cache_shortfall

    assert page_cache_shortfall(512.0, 366.2, 317.4) is None
    line = page_cache_shortfall(256.0, 366.2, 317.4)
    assert line == ("launcher.pretrain: the train .beton is 317.4 GB and the job's nodes have 256.0 GB: every epoch "
                    "would re-read it from storage; stage it to node-local disk (e.g. copy to $TMPDIR in "
                    "launcher.pretrain.setup) or ask for mem_gb >= 367")
    assert "\n" not in line


# ---- the monitor's share (issue 22 item 4) ---------------------------------------------------------
@pytest.mark.parametrize("total,per_epoch,every,at_end,hand", [
    (187_500, 625, 2500, False, 75),    # ImageNet: 187,500 / 2,500, the last step among them
    (187_500, 625, 2500, True, 300),    # + every epoch end (each 2,500th step is one too)
    (1000, 100, 300, False, 4),         # 300, 600, 900 and the last
    (1000, 100, 300, True, 10),         # every 100th (300/600/900 among them); 1000 is the last
    (936, 468, 250, False, 4),          # fmnist_r18: 250, 500, 750 and 936
])
def test_monitor_evaluations_by_hand(total, per_epoch, every, at_end, hand):
    from barlow.estimate import monitor_evaluations

    brute = sum(1 for s in range(1, total + 1)
                if s % every == 0 or s == total or (at_end and s % per_epoch == 0))
    assert monitor_evaluations(total, per_epoch, every, at_end) == hand == brute


def test_monitor_share_by_hand():
    """10 evaluations x 1,000 images (600 bank + 400 queries) x ResNet-50's forward, sharded over 8 GPUs,
    + rank 0's kNN (2 x 600 x 400 x 2048 FLOP each), against 100 steps x 256 images x (2 views x 3 x
    (backbone + projector) + 3 x 2 x 8192^2 for the loss) over the same 8 GPUs."""
    from barlow.estimate import monitor_cost

    cfg = resolve("imagenet_r50_ep300", {"pretrain": {"epochs": 1, "batch_size": 256, "monitor": {
        "bank": 600, "queries": 400, "every_steps": 10}}})
    c = model_costs("resnet50", 224, (8192, 8192, 8192), False)
    fwd, proj = c["backbone"], c["projector"]
    mon = monitor_cost(cfg, 25_600, 100, 8, 1000)
    assert (mon["evaluations"], mon["bank"], mon["queries"]) == (10, 600, 400)
    monitor = 10 * 1000 * fwd / 8 + 10 * 2 * 600 * 400 * 2048
    train = 100 * 256 * (2 * 3 * (fwd + proj) + 3 * 2 * 8192**2) / 8
    assert mon["share"] == pytest.approx(monitor / train)
    # = 10,000 / (25,600 x 6 x 1.045): the projector adds 3.7 % and the loss 0.8 % to 6 forwards an image
    assert 0.062 < mon["share"] < 0.063
    assert mon["loader_share"] == pytest.approx(10 * 1000 / (100 * 256))
    # the online head: forward + backward of 2048 -> 1000 on the first micro-batch (256 / 8 = 32 images)
    assert mon["head_flops_per_step"] == pytest.approx(3 * 2 * 2048 * 1000 * 32)
    assert mon["head_share"] == pytest.approx(3 * 2 * 2048 * 1000 / (2 * 3 * (fwd + proj) + 3 * 2 * 8192**2))
    # off: nothing
    off = resolve("imagenet_r50_ep300", {"pretrain": {"monitor": {"enabled": False}}})
    assert monitor_cost(off, IMAGENET_TRAIN, 187_500, 8, 1000)["share"] == 0


def test_imagenet_monitor_is_at_most_two_percent():
    """The preset's every_steps 2500: 75 evaluations x 60,000 images of 187,500 x 2,048 training images."""
    pre = _rows("imagenet_r50_ep300")["pretrain"]["monitor"]
    assert pre["evaluations"] == 75
    assert pre["loader_share"] == pytest.approx(75 * 60_000 / (187_500 * 2048))  # 1.17 %
    assert pre["share"] <= pre["loader_share"] <= 0.02
    # at every epoch end as well: 300 evaluations, 4.7 % where the loader bounds it
    ends = {r["stage"]: r for r in estimate(resolve("imagenet_r50_ep300", {"pretrain": {"monitor": {
        "at_epoch_end": True}}}))}["pretrain"]["monitor"]
    assert ends["evaluations"] == 300 and ends["loader_share"] == pytest.approx(300 * 60_000 / (187_500 * 2048))


def test_measured_sizes_replace_the_fallback():
    """A measured .beton size (here a stand-in BetonSize) is used as is, with its image count."""
    from barlow.beton_size import BetonSize

    beton = {"train": BetonSize(123 * GIB, 1_000_000, "sample", "stand-in"),
             "val": BetonSize(5 * GIB, 40_000, "file", "stand-in")}
    rows = {r["stage"]: r for r in estimate(resolve("imagenet_r50_ep300"), beton=beton)}
    assert rows["pretrain"]["cache_gb"] == 123 and rows["probe:avgpool"]["cache_gb"] == 128
    assert rows["convert"]["images"] == 1_040_000 and rows["pretrain"]["steps"] == 300 * (1_000_000 // 2048)
    buf = io.StringIO()
    print_estimate(resolve("imagenet_r50_ep300"), beton=beton, file=buf)
    out = buf.getvalue()
    assert "measured from a converted sample (stand-in)" in out and "assumed, not measured" not in out
    assert "--dataset <name>" not in out
