"""Profiling experiments behind the proposals in benchmarks/README.md (not part of benchmarks.run).

    python -m benchmarks.experiments step        # pretrain step: threads, channels_last, bf16 autocast
    python -m benchmarks.experiments compile     # pretrain step: torch.compile vs eager (incl. compile time)
    python -m benchmarks.experiments loader      # loader: decode only vs + augmentation, workers, aug threads
    python -m benchmarks.experiments augment     # BatchAugment per-op cost; crop as broadcast matmul vs einsum
    python -m benchmarks.experiments extract     # probe feature extraction: list+cat vs preallocated (peak RSS)
    python -m benchmarks.experiments concurrent  # two training processes at once (Snakemake co-scheduling)
    python -m benchmarks.experiments fit         # cached-probe head training: feature memory layout

Every comparison alternates its variants in one process (A B A B ...) and prints medians. barlow/
is never edited: variants are monkeypatched copies in this process.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_CACHE, fmnist_beton, load, median


def _alt(variants: dict, rounds: int) -> dict:
    res = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            res[k].append(f())
    return {k: round(median(v), 4) for k, v in res.items()}


def exp_step(rounds: int = 6):
    from benchmarks.step import BATCH, make_ours

    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randn(BATCH, 3, 32, 32, generator=g)
    _, _, cl = make_ours(True)
    _, _, contig = make_ours(False)

    def rate(step, threads=2, bf16=False):
        def f():
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                step(x1, x2)
            dt = time.perf_counter() - t0
            torch.set_num_threads(2)
            return 1 / dt
        return f

    variants = {"channels_last fp32 2 threads (preset)": rate(cl), "contiguous fp32 2 threads": rate(contig),
                "channels_last bf16 autocast 2 threads": rate(cl, bf16=True),
                "contiguous bf16 autocast 2 threads": rate(contig, bf16=True),
                "channels_last fp32 1 thread": rate(cl, threads=1)}
    for f in variants.values():
        f()
    return {"steps_per_s": _alt(variants, rounds), "batch": BATCH}


def exp_compile(rounds: int = 5):
    from benchmarks.step import BATCH, make_ours

    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randn(BATCH, 3, 32, 32, generator=g)
    model, _, eager = make_ours(True)
    cmodel, _, _ = make_ours(True)
    # compile the model's forward; the step body (loss, backward, LARS) as in barlow/pretrain.py
    from barlow.loss import barlow_twins_loss
    from barlow.optim import LARS, param_groups, set_lr
    from benchmarks.step import LR, WD

    opt = LARS(param_groups(cmodel, WD, 0.024), lr=LR)
    set_lr(opt, LR)
    net = torch.compile(cmodel)

    def cstep(a, b):
        a, b = a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
        loss = barlow_twins_loss(net(a).float(), net(b).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    cstep(x1, x2)
    cstep(x1, x2)
    compile_s = time.perf_counter() - t0

    def rate(step):
        def f():
            t = time.perf_counter()
            step(x1, x2)
            return 1 / (time.perf_counter() - t)
        return f

    eager(x1, x2)
    return {"steps_per_s": _alt({"eager": rate(eager), "torch.compile": rate(cstep)}, rounds),
            "compile_plus_2_steps_s": round(compile_s, 1)}


def exp_loader(n: int = 8192, rounds: int = 3):
    from barlow.augment import BatchAugment, barlow_views
    from barlow.loader import make_loader, split_batch
    from barlow.augment import views_from_config
    from barlow import config as bc

    beton = fmnist_beton(DEFAULT_CACHE, "train", n)
    full = [BatchAugment(v) for v in barlow_views(32)]
    cfg = bc.resolve("fmnist_r18")
    cfg["data"]["image_size"] = 32
    preset = [BatchAugment(v) for v in views_from_config(cfg)]
    loaders = {w: make_loader(beton, 128, views=2, workers=w, seed=0) for w in (1, 2)}  # numba caps threads at the cores

    def epoch(w, augs, threads=2):
        def f():
            torch.set_num_threads(threads)
            seen, t0 = 0, time.perf_counter()
            it = iter(loaders[w])
            for i, b in enumerate(it):
                (x1, x2), _ = split_batch(b, 2)
                if augs:
                    gen = torch.Generator().manual_seed(i)
                    augs[0](x1, gen).contiguous(memory_format=torch.channels_last)
                    augs[1](x2, gen).contiguous(memory_format=torch.channels_last)
                seen += x1.shape[0]
            torch.set_num_threads(2)
            return seen / (time.perf_counter() - t0)
        return f

    for w in loaders:
        epoch(w, None)()  # numba JIT
    variants = {"decode only, 2 workers": epoch(2, None),
                "full aug, 1 worker": epoch(1, full), "full aug, 2 workers": epoch(2, full),
                "full aug, 2 workers, aug 1 thread": epoch(2, full, 1), "full aug, 1 worker, aug 1 thread": epoch(1, full, 1),
                "preset aug (fmnist_r18), 2 workers": epoch(2, preset)}
    return {"samples_per_s": _alt(variants, rounds), "images": n}


def exp_augment(rounds: int = 5, n: int = 128):
    import barlow.augment as A

    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    v1, v2 = A.barlow_views(32)
    a1, a2 = A.BatchAugment(v1), A.BatchAugment(v2)
    orig = A.resized_crop

    def crop_matmul(x, boxes, size, flip=None):
        n_, _, h, w = x.shape
        boxes = torch.as_tensor(boxes).cpu()
        my = A._resize_matrix(boxes[:, 0], boxes[:, 2], size, h, None, x.device)
        mx = A._resize_matrix(boxes[:, 1], boxes[:, 3], size, w, flip, x.device)
        return torch.matmul(torch.matmul(my.unsqueeze(1), x), mx.transpose(1, 2).unsqueeze(1))

    def rate(crop, threads=2):
        def f():
            A.resized_crop = crop
            torch.set_num_threads(threads)
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            for _ in range(10):
                a1(x, g)
                a2(x, g)
            dt = time.perf_counter() - t0
            A.resized_crop = orig
            torch.set_num_threads(2)
            return 10 * n / dt
        return f

    g = torch.Generator().manual_seed(1)
    p = a1.sample_params(n, 32, 32, g)
    same = torch.equal(orig(x.float(), p.boxes, 32, p.flip), crop_matmul(x.float(), p.boxes, 32, p.flip))
    close = float((orig(x.float(), p.boxes, 32, p.flip) - crop_matmul(x.float(), p.boxes, 32, p.flip)).abs().max())
    res = _alt({"einsum crop (current), 2 threads": rate(orig), "matmul crop, 2 threads": rate(crop_matmul),
                "einsum crop, 1 thread": rate(orig, 1), "matmul crop, 1 thread": rate(crop_matmul, 1)}, rounds)
    # per-op cost (1 call of each op on the whole batch, 2 threads)
    xf = x.float() / 255
    f4 = torch.rand(n)
    ops = {"resized_crop": lambda: orig(xf, p.boxes, 32, p.flip), "adjust_brightness": lambda: A.adjust_brightness(xf, f4),
           "adjust_contrast": lambda: A.adjust_contrast(xf, f4), "adjust_saturation": lambda: A.adjust_saturation(xf, f4),
           "adjust_hue": lambda: A.adjust_hue(xf, f4 - 0.5), "to_grayscale": lambda: A.to_grayscale(xf),
           "gaussian_blur": lambda: A.gaussian_blur(xf, f4 + 0.1, 3), "sample_params": lambda: a1.sample_params(n, 32, 32, g)}
    per_op = {}
    for k, f in ops.items():
        f()
        t0 = time.perf_counter()
        for _ in range(20):
            f()
        per_op[k] = round((time.perf_counter() - t0) / 20 * 1000, 3)
    return {"samples_per_s_two_views": res, "crop_bitwise_equal": same, "crop_max_abs_diff": close,
            "per_op_ms_full_batch_128": per_op}


def _hwm_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def exp_extract(n: int = 8192, variant: str | None = None):
    """Peak RSS of feature extraction on n images: barlow.probe._extract (preallocated outputs, since
    28c9068) vs the list of per-batch chunks + torch.cat it replaced."""
    if variant is None:  # one child per variant: VmHWM is per process
        out = {}
        for v in ("list_cat", "preallocated", "list_cat", "preallocated"):
            r = subprocess.run([sys.executable, "-m", "benchmarks.experiments", "extract", "--variant", v, "--n", str(n)],
                               capture_output=True, text=True, check=True)
            d = json.loads(r.stdout.strip().splitlines()[-1])
            out.setdefault(v, []).append(d)
        return out
    import barlow.probe as bp
    from barlow.augment import BatchAugment
    from barlow.loader import make_loader, split_batch
    from barlow.model import backbone

    beton = fmnist_beton(DEFAULT_CACHE, "train", n)

    @torch.no_grad()
    def extract_list_cat(probes, path, heads, aug, pcfg, workers, seed, indices, device, decode, size):
        ratio = size / pcfg.get("eval_resize", round(size * 256 / 224))
        loader = make_loader(path, pcfg["batch_size"], train=False, workers=workers, seed=seed, decode=decode, size=size,
                             indices=indices, device=device, drop_last=False, center_ratio=ratio)
        feats, ys = {h: [] for h in heads}, []
        it = iter(loader)
        try:
            for batch in it:
                (x,), y = split_batch(batch, 1)
                for k, v in probes.pooled(aug(x), heads).items():
                    feats[k].append(v.to(torch.float16).cpu())
                ys.append(y.long().cpu().clone())
        finally:
            it.close()
        return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(ys)

    torch.manual_seed(0)
    probes = bp.Probes(backbone("resnet18"), 32)
    aug = BatchAugment(bp.eval_view(32, {}, (0.286,) * 3, (0.353,) * 3))
    fn = bp._extract if variant == "preallocated" else extract_list_cat
    base = _hwm_mb()
    t0 = time.perf_counter()
    f, y = fn(probes, beton, bp.HEADS, aug, {"batch_size": 256}, 2, 0, None, "cpu", "simple", 32)
    wall = time.perf_counter() - t0
    feat_mb = sum(v.numel() * v.element_size() for v in f.values()) / 2**20
    print(json.dumps({"variant": variant, "images": n, "hwm_before_mb": round(base), "hwm_after_mb": round(_hwm_mb()),
                      "growth_mb": round(_hwm_mb() - base), "features_mb": round(feat_mb), "wall_s": round(wall, 1)}))


def exp_fit(n: int = 20000, rounds: int = 2):
    """One epoch of barlow.probe._fit_cached (the default probe's 30-epoch head training) on n cached
    features: as _extract leaves them (channels_last strides from oneDNN) vs made contiguous once."""
    import barlow.probe as bp
    from barlow import config as bc
    from barlow.model import backbone

    cfg = bc.resolve("fmnist_r18")
    pcfg = {**cfg["probe"]["passes"][0], "epochs": 1}
    probes = bp.Probes(backbone("resnet18"), 32)
    with torch.no_grad():  # the real strides: pool a real forward
        real = probes.pooled(torch.randn(4, 3, 32, 32), bp.HEADS)
    g = torch.Generator().manual_seed(0)
    feats = {}
    for k, v in real.items():
        t = torch.randn((n, *v.shape[1:]), generator=g).half()
        feats[k] = t.contiguous(memory_format=torch.channels_last) if not v.is_contiguous() else t
    strides = {k: [tuple(real[k].stride()), real[k].is_contiguous()] for k in real}
    contig = {k: v.contiguous() for k, v in feats.items()}
    y = torch.randint(0, 10, (n,), generator=g)

    def run(f):
        def go():
            torch.manual_seed(0)
            trainers = bp.make_trainers(probes, pcfg, 10, "cpu")
            t0 = time.perf_counter()
            bp._fit_cached(trainers, f, y, pcfg["batch_size"], 0, lambda *_: None)
            return time.perf_counter() - t0
        return go

    res = _alt({"as extracted (channels_last strides)": run(feats), "contiguous": run(contig)}, rounds)
    per_head = {}
    for name in bp.HEADS:  # one head alone, as extracted vs contiguous
        sub = [name]
        pc = {**pcfg, "heads": sub}

        def one(f, pc=pc):
            def go():
                trainers = bp.make_trainers(probes, pc, 10, "cpu")
                t0 = time.perf_counter()
                bp._fit_cached(trainers, f, y, pc["batch_size"], 0, lambda *_: None)
                return time.perf_counter() - t0
            return go
        per_head[name] = _alt({"as extracted": one(feats), "contiguous": one(contig)}, 1)
    return {"epoch_s": res, "images": n, "per_head_epoch_s": per_head, "real_pooled_strides": strides,
            "default_probe_epochs": cfg["probe"]["passes"][0]["epochs"]}


def _preset_batches(images: int, limit: int | None = None):
    """The fmnist_r18 preset's resolved config and real augmented channels_last batches (first `limit`)."""
    from barlow import config as bc
    from barlow.loader import make_loader, split_batch
    from barlow.pretrain import _augmenters

    cfg = bc.resolve("fmnist_r18")
    cfg["data"]["image_size"] = 32
    aug1, aug2 = _augmenters(cfg)
    loader = make_loader(fmnist_beton(DEFAULT_CACHE, "train", images), 128, views=2, workers=2, seed=0)
    batches = []
    it = iter(loader)
    try:
        for i, b in enumerate(it):
            (x1, x2), _ = split_batch(b, 2)
            g = torch.Generator().manual_seed(i)
            batches.append((aug1(x1, g).contiguous(memory_format=torch.channels_last),
                            aug2(x2, g).contiguous(memory_format=torch.channels_last)))
            if len(batches) == limit:
                break
    finally:
        it.close()
    return cfg, batches


def exp_realstep(rounds: int = 4, steps: int = 6):
    """The preset's real training step (fmnist_r18: AdamW, channels_last, its augmentation) on real
    batches vs random-normal inputs, with/without flush-denormal, and with the FFCV loader running."""
    from barlow.loss import barlow_twins_loss
    from barlow.model import BarlowTwins
    from barlow.optim import make_optimizer

    from barlow.loader import make_loader, split_batch
    from barlow.pretrain import _augmenters

    cfg, real = _preset_batches(8192)
    p = cfg["pretrain"]
    aug1, aug2 = _augmenters(cfg)
    loader = make_loader(fmnist_beton(DEFAULT_CACHE, "train", 8192), 128, views=2, workers=2, seed=0)
    torch.manual_seed(0)
    model = BarlowTwins("resnet18", cfg["model"]["projector"]).to(memory_format=torch.channels_last).train()
    opt = make_optimizer(model, p["optimizer"], p["lr"], p["weight_decay"], bias_lr_ratio=p["bias_lr_ratio"])
    gen = torch.Generator().manual_seed(0)
    rnd = [(torch.randn(128, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last),
            torch.randn(128, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)) for _ in range(steps)]

    def step(x1, x2):
        loss = barlow_twins_loss(model(x1).float(), model(x2).float(), p["lambd"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def on(batches, flush=False):
        def f():
            torch.set_flush_denormal(flush)
            t0 = time.perf_counter()
            for x1, x2 in batches[:steps]:
                step(x1, x2)
            torch.set_flush_denormal(False)
            return steps / (time.perf_counter() - t0)
        return f

    def with_loader(flush=False):
        def f():
            torch.set_flush_denormal(flush)
            n, t0 = 0, time.perf_counter()
            it = iter(loader)
            for i, b in enumerate(it):
                (x1, x2), _ = split_batch(b, 2)
                g = torch.Generator().manual_seed(i)
                step(aug1(x1, g).contiguous(memory_format=torch.channels_last),
                     aug2(x2, g).contiguous(memory_format=torch.channels_last))
                n += 1
                if n == steps:
                    break
            it.close()
            torch.set_flush_denormal(False)
            return n / (time.perf_counter() - t0)
        return f

    variants = {"random-normal batches": on(rnd), "real augmented batches": on(real),
                "real batches, flush_denormal": on(real, True), "loader + aug + step (as pretrain.py)": with_loader(),
                "loader + aug + step, flush_denormal": with_loader(True)}
    for f in variants.values():
        f()
    return {"steps_per_s": _alt(variants, rounds), "steps_per_measure": steps, "optimizer": p["optimizer"]}


def exp_bf16(steps: int = 60):
    """The preset's training (AdamW, channels_last, its augmentation) for `steps` steps on the same real
    batches from the same init, fp32 vs bf16 autocast (precision: amp_bf16): speed and loss curves."""
    from barlow.loss import barlow_twins_loss
    from barlow.model import BarlowTwins
    from barlow.optim import make_optimizer

    cfg, batches = _preset_batches(20480, limit=steps)
    p = cfg["pretrain"]
    out = {}
    for name, dtype in (("fp32", None), ("amp_bf16", torch.bfloat16), ("fp32 (repeat)", None), ("amp_bf16 (repeat)", torch.bfloat16)):
        torch.manual_seed(0)
        model = BarlowTwins("resnet18", cfg["model"]["projector"]).to(memory_format=torch.channels_last).train()
        opt = make_optimizer(model, p["optimizer"], p["lr"], p["weight_decay"], bias_lr_ratio=p["bias_lr_ratio"])
        for grp in opt.param_groups:
            grp["lr"] = p["lr"] * 0.25  # a mid-warmup learning rate
        losses, t0 = [], time.perf_counter()
        for x1, x2 in batches:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                z1, z2 = model(x1), model(x2)
            loss = barlow_twins_loss(z1.float(), z2.float(), p["lambd"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(float(loss), 2))
        dt = time.perf_counter() - t0
        out[name] = {"steps_per_s": round(len(batches) / dt, 3), "loss_every_10": losses[::10] + [losses[-1]],
                     "mean_loss_last_10": round(sum(losses[-10:]) / 10, 2)}
    return out


def exp_concurrent(seconds: float = 40):
    """Two step loops at once (as Snakemake runs pretrain + probe with --cores 2 and threads: 1 rules)."""
    code = ("import sys,time,torch; torch.set_num_threads(int(sys.argv[1])); from benchmarks.step import make_ours, BATCH;"
            "_,_,s=make_ours(True); x=torch.randn(BATCH,3,32,32); s(x,x); n=0; t=time.perf_counter()\n"
            "while time.perf_counter()-t<float(sys.argv[2]): s(x,x); n+=1\n"
            "print(n/(time.perf_counter()-t))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def run(threads, k):
        ps = [subprocess.Popen([sys.executable, "-c", code, str(threads), str(seconds)], stdout=subprocess.PIPE,
                               text=True, env=env) for _ in range(k)]
        return [round(float(p.communicate()[0]), 3) for p in ps]

    out = {}
    for label, threads, k in (("one process, 2 threads", 2, 1), ("two processes, 2 threads each", 2, 2),
                              ("two processes, 1 thread each", 1, 2)):
        r = run(threads, k)
        out[label] = {"steps_per_s_each": r, "total_steps_per_s": round(sum(r), 3)}
    return out


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["step", "compile", "loader", "augment", "extract", "concurrent", "fit", "realstep", "bf16"])
    ap.add_argument("--variant")
    ap.add_argument("--n", type=int)
    args = ap.parse_args(argv)
    before = load()
    fn = globals()[f"exp_{args.what}"]
    if args.what == "extract" and args.variant:
        return fn(args.n or 8192, args.variant)
    res = fn(**({"n": args.n} if args.n else {}))
    print(json.dumps({"experiment": args.what, "result": res, "load_avg_before": before, "load_avg_after": load(),
                      "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
