"""Figure ``pretrain_step``: one Barlow Twins optimizer step, ours vs the official main.py way.

Ours: ``barlow.model.BarlowTwins`` (torchvision ResNet-18, projector [1024, 1024, 1024]) in
channels_last as the fmnist_r18 preset trains it, ``barlow.loss.barlow_twins_loss`` and
``barlow.optim.LARS`` with ``param_groups`` (the step body of barlow/pretrain.py: forward both views,
loss, finiteness check, backward, LARS, zero_grad). Peer: ``barlow.reference_bt`` (main.py's
module, loss-in-model with BatchNorm1d(affine=False) and off_diagonal, per-parameter LARS loop).
Both: batch 128 per view, 32 px, fp32, the same pre-augmented input tensors, this process's torch
threads. Steps alternate in blocks (ours, peer, ours, ...); medians of steps/s.

``pretrain_step_bf16``: the same two steps under ``torch.autocast("cpu", bfloat16)`` (main.py's
``amp.autocast()`` on a CPU), alternating with the fp32 ones in the same rounds, so the bf16
speed-up of each side is measured in the same run.

Also measured once: the FLOPs of one step with ``torch.utils.flop_counter.FlopCounterMode`` (so
achieved GFLOP/s = FLOPs x steps/s), and the machine's fp32 matmul GFLOP/s (2048 x 2048 GEMMs) in
the same process, before and after the steps.
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import base_parser, emit, figure, load, log, median

BATCH, SIZE, PROJ, ARCH, LAMBD = 128, 32, [1024, 1024, 1024], "resnet18", 0.0051
LR, WD = 0.2 * BATCH / 256, 1e-6


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / median(ts) / 1e9


def make_ours(channels_last: bool = True, amp: torch.dtype | None = None):
    """The trainer's own step: ``barlow.train_step.train_step`` (forwards, loss, backward), then LARS."""
    from barlow.loss import Objective
    from barlow.model import BarlowTwins
    from barlow.optim import LARS, param_groups, set_lr
    from barlow.train_step import train_step

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = BarlowTwins(ARCH, PROJ, zero_init_residual=True).to(memory_format=fmt).train()
    opt = LARS(param_groups(model, WD, 0.024), lr=LR, momentum=0.9, eta=0.001)
    set_lr(opt, LR)

    objective = Objective("exact", LAMBD)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step(x1, x2):
        x1 = x1.contiguous(memory_format=fmt)
        x2 = x2.contiguous(memory_format=fmt)
        loss = train_step(model, [(x1, x2)], objective, offset=0, total=x1.shape[0], scaler=scaler, amp_dtype=amp)
        if not torch.isfinite(loss):
            raise FloatingPointError("loss is not finite")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.item())

    return model, opt, step


def make_reference(amp: torch.dtype | None = None):
    from barlow.reference_bt import ReferenceBarlowTwins, reference_optimizer

    torch.manual_seed(0)
    model = ReferenceBarlowTwins(ARCH, PROJ, BATCH, LAMBD).train()
    opt = reference_optimizer(model, LR, LR * 0.024, WD)

    def step(x1, x2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):  # main.py: amp.autocast()
            loss = model(x1, x2)
        loss.backward()
        opt.step()
        return float(loss.item())

    return model, opt, step


def count_flops(step, x1, x2) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step(x1, x2)
    return int(fc.get_total_flops())


def time_optimizer(opt, model, reps: int = 5) -> float:
    """Median seconds of opt.step() alone (gradients filled with noise)."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - t0)
    for p in model.parameters():
        p.grad = None
    return median(ts)


def main(argv=None):
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 4 quick / 12 full)")
    ap.add_argument("--block", type=int, help="steps per side per round (default 1 quick / 2 full)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 12)
    block = args.block or (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load()

    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    x2 = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    mm_before = matmul_gflops()
    ours_model, ours_opt, ours = make_ours()
    ref_model, ref_opt, ref = make_reference()
    _, _, ours_bf = make_ours(amp=torch.bfloat16)
    _, _, ref_bf = make_reference(amp=torch.bfloat16)
    n_ours = sum(p.numel() for p in ours_model.parameters())
    n_ref = sum(p.numel() for p in ref_model.parameters())

    flops_ours = count_flops(ours, x1, x2)
    flops_ref = count_flops(ref, x1, x2)
    for _ in range(2):  # warm-up (oneDNN primitive caches, allocator)
        for f in (ours, ref, ours_bf, ref_bf):
            f(x1, x2)

    def block_rate(step):
        t0 = time.perf_counter()
        for _ in range(block):
            step(x1, x2)
        return block / (time.perf_counter() - t0)

    ra, rb, rc, rd = [], [], [], []
    for i in range(rounds):
        ra.append(block_rate(ours))
        rb.append(block_rate(ref))
        rc.append(block_rate(ours_bf))
        rd.append(block_rate(ref_bf))
        log(f"  round {i + 1}/{rounds}: fp32 ours {ra[-1]:.3f} reference {rb[-1]:.3f}; "
            f"bf16 autocast ours {rc[-1]:.3f} reference {rd[-1]:.3f} steps/s")
    opt_ours, opt_ref = [], []
    for _ in range(3):
        opt_ours.append(time_optimizer(ours_opt, ours_model))
        opt_ref.append(time_optimizer(ref_opt, ref_model))
    mm_after = matmul_gflops()
    a, b = median(ra), median(rb)
    mm = median([mm_before, mm_after])
    details = {
        "arch": ARCH, "projector": PROJ, "batch_per_view": BATCH, "image_size": SIZE, "precision": "fp32",
        "ours_memory_format": "channels_last", "reference_memory_format": "contiguous",
        "rounds_alternating": rounds, "steps_per_block": block,
        "ours_steps_per_s": [round(x, 4) for x in ra], "peer_steps_per_s": [round(x, 4) for x in rb],
        "ours_samples_per_s": round(a * BATCH, 1), "peer_samples_per_s": round(b * BATCH, 1),
        "step_gflop": {"ours": round(flops_ours / 1e9, 3), "reference": round(flops_ref / 1e9, 3)},
        "achieved_gflops": {"ours": round(flops_ours * a / 1e9, 2), "reference": round(flops_ref * b / 1e9, 2)},
        "matmul_fp32_gflops_2048": {"before": round(mm_before, 1), "after": round(mm_after, 1), "median": round(mm, 1)},
        "fraction_of_matmul_peak": {"ours": round(flops_ours * a / 1e9 / mm, 3), "reference": round(flops_ref * b / 1e9 / mm, 3)},
        "optimizer_step_s": {"ours_lars_foreach": round(median(opt_ours), 4), "reference_lars_loop": round(median(opt_ref), 4)},
        "parameters": {"ours": n_ours, "reference": n_ref,
                       "note": "ours keeps Linear biases in the projector (model default), main.py has none"},
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode, one full step (2 forwards, loss, backward)",
        "target_ratio": 1.0, "torch_threads": torch.get_num_threads(),
        "load_avg_before": load_before, "load_avg_after": load(), "mode": "quick" if args.quick else "full",
    }
    c, d = median(rc), median(rd)
    bf_details = {
        "precision": "bf16 autocast (forward; ours: loss in fp32 as barlow/pretrain.py, reference: loss inside "
                     "autocast as main.py)", "ours_steps_per_s": [round(x, 4) for x in rc],
        "peer_steps_per_s": [round(x, 4) for x in rd], "ours_samples_per_s": round(c * BATCH, 1),
        "peer_samples_per_s": round(d * BATCH, 1), "speedup_over_fp32": {"ours": round(c / a, 3), "reference": round(d / b, 3)},
        "cpu_flags_bf16": "avx512_bf16" in open("/proc/cpuinfo").read(),
        **{k: details[k] for k in ("arch", "projector", "batch_per_view", "image_size", "rounds_alternating",
                                   "steps_per_block", "torch_threads", "load_avg_before", "load_avg_after", "mode")},
    }
    emit(args, [figure("pretrain_step", a, "steps/s", "facebookresearch/barlowtwins main.py step (re-typed)", b,
                       a / b, details),
                figure("pretrain_step_bf16", c, "steps/s", "the same reference step under bf16 autocast", d, c / d,
                       bf_details)])


if __name__ == "__main__":
    main()
