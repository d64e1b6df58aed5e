"""GPU smoke check: every CUDA path of the ImageNet presets in minutes, with images/s per stage.

    python -m benchmarks.gpu_smoke                      # on a CUDA machine; writes benchmarks/gpu_smoke.json
    python -m benchmarks.gpu_smoke --batch 128          # a GPU that cannot hold 256 two-view 224 px images
    python -m benchmarks.gpu_smoke --only pretrain_amp_fp16,ddp --keep
    python -m benchmarks.gpu_smoke --data /datasets/imagenet --images 4096
    python -m benchmarks.gpu_smoke --device cpu --quick --arch resnet18 --image-size 32 --projector 256,256,256

Each check prints PASS, FAIL (with the error) or SKIP (with the reason) and the run goes on after a
failure; the exit status is 1 if any check failed. Checks: tiny ImageNet-style class folder of odd
image modes (or --data) -> .beton (proportion, max side 500); FFCV rrc two-view decoding (host, and
ToDevice to the GPU); smoke pretraining of imagenet_r50_ep300 in fp32 (its own precision,
channels_last), amp_fp16 (GradScaler) and amp_bf16, and of imagenet_r50_ep300_accu4 (gradient
caching); the published two-pass and the single-pass probes; 2 processes (nccl + SyncBatchNorm with
>= 2 GPUs, else gloo on GPU 0 without SyncBN) running pretraining and the data-parallel probe.
Pretraining images/s is the median of metrics.csv's per-step samples_per_s after --warmup steps
(cudnn.benchmark's search), "wall" the same steps by wall time (epoch-end checkpoints included).
With --device cpu the CUDA-only checks report SKIP and the figures go to --out (default: a temp
dir), so benchmarks/gpu_smoke.json only ever holds GPU figures.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import faulthandler
import gc
import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "gpu_smoke.json"
PRETRAIN, ACCU4, FASTPROBE = "imagenet_r50_ep300", "imagenet_r50_ep300_accu4", "imagenet_r50_ep300_fastprobe"
CLASSES = 10


class Skip(Exception):
    """A check that cannot run here (reason in the message): reported as SKIP, not as PASS or FAIL."""


@dataclasses.dataclass
class Ctx:
    args: argparse.Namespace
    device: str                    # "cuda:0" or "cpu"
    work: Path
    train: Path | None = None
    val: Path | None = None
    backbone: Path | None = None   # from pretrain_fp32, for the probes

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# --------------------------------------------------------------------------- data

def write_class_folder(root: Path, train_per_class: int, val_per_class: int, seed: int = 0) -> Path:
    """root/{train,val}/<class>/<img>: smooth random images (JPEG-like sizes) at ImageNet-like sizes,
    mostly RGB JPEG plus every odd mode a real copy may hold (grey, CMYK, RGBA, 16-bit, palette),
    some larger than the .beton's max side 500 (adapted from tests.conftest.write_odd_image_folder)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (300, 400), (160, 120), (640, 480), (250, 250), (120, 200), (375, 500)]
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(CLASSES):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                low = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
                rgb = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR))
                kind = i % 12
                if kind == 1:
                    Image.fromarray(rgb[..., 0]).save(d / f"{i}.png")                          # L
                elif kind == 3:
                    Image.fromarray(rgb).convert("CMYK").save(d / f"{i}.jpg")                  # CMYK JPEG
                elif kind == 5:
                    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(d / f"{i}.png")       # RGBA
                elif kind == 7:
                    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(d / f"{i}.png")  # 16-bit
                elif kind == 9:
                    Image.fromarray(rgb).convert("P").save(d / f"{i}.png")                     # palette
                else:
                    Image.fromarray(rgb).save(d / f"{i}.JPEG", quality=90)
    return root


def check_data(ctx: Ctx) -> dict:
    from barlow.data import WriteOptions, convert

    a = ctx.args
    root = Path(a.data) if a.data else write_class_folder(ctx.work / "images", math.ceil(a.images / CLASSES),
                                                          math.ceil(a.val_images / CLASSES))
    opts = WriteOptions("proportion", 500, 90, 0.5)
    t0 = time.perf_counter()
    tr = convert("image_folder", str(root), "train", ctx.work / "train.beton", limit=a.images, workers=a.workers,
                 options=opts)
    va = convert("image_folder", str(root), "val", ctx.work / "val.beton", limit=a.val_images, workers=a.workers,
                 options=opts, classes=tr["classes"])
    dt = time.perf_counter() - t0
    need = max(a.batch, a.probe_batch)
    if tr["images"] < need:
        raise ValueError(f"{root}/train: {tr['images']} images, fewer than one batch of {need}; lower --batch")
    ctx.train, ctx.val = ctx.work / "train.beton", ctx.work / "val.beton"
    return {"images_per_s": (tr["images"] + va["images"]) / dt, "train_images": tr["images"],
            "val_images": va["images"], "classes": len(tr["classes"]), "source": str(root),
            "note": f"{tr['images']} + {va['images']} images -> .beton"}


# --------------------------------------------------------------------------- configs

def experiment(ctx: Ctx, preset: str, batch: int | None = None) -> dict:
    """``smoke(resolve(preset))`` with the benchmark's batch, steps, image count and overrides."""
    from barlow.config import resolve, smoke

    a = ctx.args
    over: dict = {}
    if a.arch:
        over.setdefault("model", {})["arch"] = a.arch
    if a.projector:
        over.setdefault("model", {})["projector"] = [int(x) for x in a.projector.split(",")]
    if a.image_size:
        over["data"] = {"image_size": a.image_size}
        over["pretrain"] = {"augment": {"view1": {"size": a.image_size}, "view2": {"size": a.image_size}}}
    if a.arch or a.image_size:
        over["probe"] = {"pooling": "auto"}  # the published table exists for ResNet-50 at 224 px only
    full = resolve(preset, over)
    cfg = smoke(full)
    p, fp = cfg["pretrain"], full["pretrain"]
    batch = batch or a.batch
    if fp.get("loss_group"):  # keep the recipe's number of as-trained groups (8), as smoke() does
        p["loss_group"] = max(1, batch // max(1, fp["batch_size"] // fp["loss_group"]))
    p.pop("limit_train", None)
    # checkpoint only at epoch ends and at the end: a ResNet-50 checkpoint is 1.4 GB
    p.update(batch_size=batch, max_steps=a.steps, workers=a.workers, checkpoint_every_steps=10**9)
    cfg["probe"].pop("limit_train", None)
    cfg["probe"]["workers"] = a.workers
    for ps in cfg["probe"]["passes"]:
        ps["batch_size"] = a.probe_batch
        if a.image_size:  # keep the published resize 256 -> crop 224 ratio
            ps["eval_resize"] = round(a.image_size * 256 / 224)
    return cfg


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        # the monitor's columns are empty on steps it did not evaluate
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def rates(rows: list[dict], batch: int, warmup: int) -> dict:
    """Median per-step images/s after ``warmup`` steps, and the same steps by wall time."""
    w = min(warmup, len(rows) - 1)
    meas = rows[w:]
    wall = rows[-1]["elapsed_s"] - (rows[w - 1]["elapsed_s"] if w else 0.0)
    return {"images_per_s": statistics.median(r["samples_per_s"] for r in meas),
            "wall_images_per_s": batch * len(meas) / max(wall, 1e-9), "measured_steps": len(meas)}


@contextlib.contextmanager
def loader_spy():
    """Records the ``device`` pretraining asks FFCV to load to (ToDevice when it is CUDA)."""
    import barlow.pretrain as bp

    seen, real = [], bp.make_loader

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device", "cpu"))
        return real(*args, **kwargs)

    bp.make_loader = spy
    try:
        yield seen
    finally:
        bp.make_loader = real


# --------------------------------------------------------------------------- single-process checks

def _loader_rate(ctx: Ctx, device: str) -> dict:
    import torch
    from barlow.loader import make_loader, split_batch

    cfg = experiment(ctx, PRETRAIN)
    size, bs = cfg["data"]["image_size"], ctx.args.batch
    loader = make_loader(ctx.train, bs, views=2, train=True, workers=ctx.args.workers, decode="rrc", size=size,
                         device=device)
    times, it = [], iter(loader)
    try:
        for batch in it:
            (x1, x2), y = split_batch(batch, 2)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            for x in (x1, x2):
                assert x.device.type == torch.device(device).type, f"batch on {x.device}, asked for {device}"
                assert x.dtype == torch.uint8 and tuple(x.shape) == (bs, 3, size, size), (x.dtype, tuple(x.shape))
    finally:
        it.close()
    if len(times) < 2:
        raise ValueError(f"only {len(times)} batch(es) of {bs}: give more --images")
    return {"images_per_s": bs * (len(times) - 1) / (times[-1] - times[0]), "batches": len(times),
            "note": f"two-view rrc {size} px, {ctx.args.workers} workers, to {device}"}


def check_loader(ctx: Ctx) -> dict:
    return _loader_rate(ctx, "cpu")


def check_to_device(ctx: Ctx) -> dict:
    if not ctx.cuda:
        raise Skip("FFCV ToDevice is the CUDA path")
    return _loader_rate(ctx, ctx.device)


def _pretrain(ctx: Ctx, name: str, preset: str, precision: str | None = None) -> tuple[dict, dict, dict]:
    import torch
    from barlow.checkpoint import load_backbone
    from barlow.distributed import Env
    from barlow.pretrain import pretrain

    cfg = experiment(ctx, preset)
    if precision:
        cfg["pretrain"]["precision"] = precision
    out = ctx.work / name / "backbone.pth"
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    with loader_spy() as devices:
        pretrain(cfg, ctx.train, out, env=Env(device=ctx.device))
    rows = read_metrics(out.parent / "metrics.csv")
    steps = ctx.args.steps
    assert len(rows) == steps and [int(r["step"]) for r in rows] == list(range(1, steps + 1)), \
        f"metrics.csv has steps {[int(r['step']) for r in rows]}, expected 1..{steps}"
    bad = sum(not math.isfinite(r["loss"]) for r in rows)  # under fp16 the scaler may skip a few
    assert (bad == 0 or cfg["pretrain"]["precision"] == "amp_fp16") and math.isfinite(rows[-1]["loss"]), \
        f"non-finite loss: {[r['loss'] for r in rows]}"
    blob = load_backbone(out, cfg["model"]["arch"])
    assert all(torch.isfinite(v).all() for v in blob["state_dict"].values() if v.is_floating_point()), \
        "non-finite backbone weights"
    want = cfg["pretrain"]["precision"]
    assert blob.get("precision") == want, f"trained in {blob.get('precision')}, asked for {want}"
    if ctx.cuda:
        assert devices and all(str(d).startswith("cuda") for d in devices), f"FFCV loaded to {devices}, not the GPU"
    ckpt_path = out.parent / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    assert ckpt["step"] == steps, f"checkpoint at step {ckpt['step']}, expected {steps}"
    scaler, opt_state = dict(ckpt["scaler"]), len(ckpt["optimizer"]["state"])
    del ckpt
    ckpt_path.unlink()  # 1.4 GB for ResNet-50: keep the work dir small
    fig = {**rates(rows, cfg["pretrain"]["batch_size"], ctx.args.warmup), "batch": cfg["pretrain"]["batch_size"],
           "accumulation": cfg["pretrain"]["accumulation"], "precision": want,
           "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"], "loader_device": str(devices[0])}
    if ctx.cuda:
        fig["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    fig["note"] = f"batch {fig['batch']} x{fig['accumulation']}, {want}, loss {rows[0]['loss']:.4g} -> {rows[-1]['loss']:.4g}"
    return fig, scaler, {"optimizer_state_entries": opt_state}


def check_pretrain_fp32(ctx: Ctx) -> dict:
    fig, _, _ = _pretrain(ctx, "pretrain_fp32", PRETRAIN)  # the preset's own precision: fp32, channels_last
    ctx.backbone = ctx.work / "pretrain_fp32" / "backbone.pth"
    return fig


def check_pretrain_fp16(ctx: Ctx) -> dict:
    if not ctx.cuda:
        raise Skip("fp16 autocast + GradScaler run on CUDA only")
    fig, scaler, opt = _pretrain(ctx, "pretrain_amp_fp16", PRETRAIN, "amp_fp16")
    scale = scaler.get("scale")
    assert scale is not None, "GradScaler was not enabled (its state is empty)"
    assert math.isfinite(scale) and scale > 0 and math.log2(scale).is_integer(), f"scaler scale {scale}"
    skipped = max(0, 16 - int(math.log2(scale)))  # starts at 2**16; growth only after 2000 good steps
    assert skipped < ctx.args.steps and opt["optimizer_state_entries"] > 0, \
        f"the scaler skipped every step (scale {scale})"
    fig.update(scaler_scale=scale, scaler_skipped_steps=skipped)
    fig["note"] += f", scale 2^{int(math.log2(scale))} ({skipped} step(s) skipped)"
    return fig


def check_pretrain_bf16(ctx: Ctx) -> dict:
    import torch

    if not ctx.cuda:
        raise Skip("bf16 autocast on CUDA only (this run is the CPU dry run)")
    if not torch.cuda.is_bf16_supported():
        raise Skip(f"{torch.cuda.get_device_name()} has no native bf16")
    return _pretrain(ctx, "pretrain_amp_bf16", PRETRAIN, "amp_bf16")[0]


def check_pretrain_accu4(ctx: Ctx) -> dict:
    return _pretrain(ctx, "pretrain_accu4", ACCU4)[0]


def _probe(ctx: Ctx, name: str, preset: str) -> dict:
    from barlow.distributed import Env
    from barlow.loader import beton_length
    from barlow.probe import HEADS, run_probes
    from barlow.pretrain import pretrain

    cfg = experiment(ctx, preset)
    backbone, note = ctx.backbone, ""
    if backbone is None or not backbone.is_file():  # pretrain_fp32 failed or was not run: random weights
        backbone, note = ctx.work / name / "random" / "backbone.pth", " (random-init backbone)"
        pretrain({**cfg, "pretrain": {**cfg["pretrain"], "init": "random"}}, ctx.train, backbone,
                 env=Env(device=ctx.device))
    out = ctx.work / name / "probes.json"
    t0 = time.perf_counter()
    summary = run_probes(cfg, backbone, ctx.train, ctx.val, out, env=Env(device=ctx.device))
    dt = time.perf_counter() - t0
    assert out.is_file(), f"{out} not written"
    top1 = json.loads(out.read_text())["top1"]
    assert sorted(top1) == sorted(HEADS), f"heads {sorted(top1)}"
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 100 for v in top1.values()), top1
    n_train, n_val = beton_length(ctx.train), beton_length(ctx.val)
    forwards = sum(n_train // p["batch_size"] * p["batch_size"] * p["epochs"] + n_val for p in cfg["probe"]["passes"])
    return {"images_per_s": forwards / dt, "backbone_forwards": forwards, "top1": top1,
            "protocol": summary["protocol"], "passes": len(cfg["probe"]["passes"]),
            "note": f"{summary['protocol']}, {len(cfg['probe']['passes'])} pass(es), batch {ctx.args.probe_batch}" + note}


def check_probe_published(ctx: Ctx) -> dict:
    return _probe(ctx, "probe_published", PRETRAIN)


def check_probe_single_pass(ctx: Ctx) -> dict:
    return _probe(ctx, "probe_single_pass", FASTPROBE)


# --------------------------------------------------------------------------- two processes

def _dist_worker(rank: int, world: int, port: int, backend: str, devices: list[str], cfg: dict, paths: dict) -> None:
    import torch
    import torch.distributed as dist

    import barlow.pretrain as bp
    from barlow.distributed import Env
    from barlow.probe import run_probes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    quiet_numba_finalizers()
    device = devices[rank]
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    models = []

    class Captured(bp.BarlowTwins):  # the trained module itself, to compare the ranks' weights
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            models.append(self)

    bp.BarlowTwins = Captured
    try:
        mine = Path(paths["run"] if rank == 0 else paths["other"])  # rank 1's dirs must stay empty
        index = torch.device(device).index or 0
        env = Env(rank, world, index, device)
        barrier = (lambda: dist.barrier(device_ids=[index])) if backend == "nccl" else dist.barrier
        bp.pretrain(cfg, paths["train"], mine / "pretrain" / "backbone.pth", env=env)
        barrier()
        backbone = Path(paths["run"]) / "pretrain" / "backbone.pth"  # rank 0's: the only one written
        summary = run_probes(cfg, backbone, paths["train"], paths["val"], mine / "probe" / "probes.json", env=env)
        model = models[-1]
        state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
        sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        torch.save({"backbone": state, "top1": summary["top1"], "syncbn_layers": sync},
                   Path(paths["results"]) / f"rank{rank}.pt")
        barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()


def _spawn(args: tuple, timeout: float) -> None:
    import torch.multiprocessing as mp

    pc = mp.start_processes(_dist_worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not pc.join(timeout=5):
            if time.time() > deadline:
                raise TimeoutError(f"the 2 processes did not finish in {timeout:.0f} s (hung collective?)")
    except mp.ProcessRaisedException as e:  # its message is the child's traceback: keep the error line
        print(e, file=sys.stderr)
        last = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1]
        raise RuntimeError(f"rank {e.error_index}: {last}") from None
    finally:
        for p in pc.processes:
            if p.is_alive():
                p.kill()


def _ddp_plan(ctx: Ctx) -> tuple[str, list[str], bool, str]:
    import torch

    if not ctx.cuda:
        return "gloo", ["cpu", "cpu"], False, "gloo on the CPU"
    if torch.cuda.device_count() >= 2:
        return "nccl", ["cuda:0", "cuda:1"], True, "nccl on cuda:0 + cuda:1, SyncBatchNorm"
    return "gloo", ["cuda:0", "cuda:0"], False, "gloo, both processes on cuda:0; SyncBN skipped (needs nccl, 2 GPUs)"


def check_ddp(ctx: Ctx) -> dict:
    import torch

    backend, devices, sync_bn, how = _ddp_plan(ctx)
    per_rank = max(8, ctx.args.batch // 4)
    cfg = experiment(ctx, FASTPROBE, batch=2 * per_rank)  # imagenet_r50_ep300 + the single-pass probe
    cfg["model"]["sync_bn"] = sync_bn
    root = ctx.work / "ddp"
    paths = {k: str(root / k) for k in ("run", "other", "results")}
    for d in paths.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    paths.update(train=str(ctx.train), val=str(ctx.val))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _spawn((2, port, backend, devices, cfg, paths), ctx.args.check_timeout)
    r0, r1 = (torch.load(Path(paths["results"]) / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    written = [str(p.relative_to(root)) for p in Path(paths["other"]).rglob("*") if p.is_file()]
    assert not written, f"rank 1 wrote files: {written}"
    saved = torch.load(Path(paths["run"]) / "pretrain" / "backbone.pth", weights_only=False)["state_dict"]
    # Without SyncBN each rank's BatchNorm running statistics come from its own last batch: compare weights only.
    compared = [k for k in r0["backbone"] if sync_bn or not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    differ = [k for k in compared if not torch.equal(r0["backbone"][k], r1["backbone"][k])]
    assert not differ, f"ranks disagree on {len(differ)} of {len(compared)} tensor(s), e.g. {differ[:3]}"
    assert (r0["syncbn_layers"] > 0) == sync_bn, f"{r0['syncbn_layers']} SyncBatchNorm layers with sync_bn {sync_bn}"
    assert all(torch.equal(saved[k], v) for k, v in r0["backbone"].items()), "backbone.pth differs from rank 0's model"
    assert r0["top1"] == r1["top1"], f"probe top-1 differs: {r0['top1']} vs {r1['top1']}"
    probes = Path(paths["run"]) / "probe" / "probes.json"
    assert probes.is_file() and json.loads(probes.read_text())["top1"] == r0["top1"], f"{probes} missing or different"
    rows = read_metrics(Path(paths["run"]) / "pretrain" / "metrics.csv")
    assert len(rows) == ctx.args.steps and all(math.isfinite(r["loss"]) for r in rows), "metrics.csv incomplete"
    return {**rates(rows, 2 * per_rank, ctx.args.warmup), "backend": backend, "devices": devices,
            "sync_bn": sync_bn, "syncbn_layers": r0["syncbn_layers"], "global_batch": 2 * per_rank,
            "compared_tensors": len(compared), "top1": r0["top1"],
            "note": f"{how}; global batch {2 * per_rank}, single-pass probe; ranks agree, only rank 0 wrote"}


def check_syncbn(ctx: Ctx, ddp: dict | None) -> dict:
    if not ctx.cuda:
        raise Skip("SyncBatchNorm needs nccl on CUDA")
    if ddp is None or ddp.get("status") != "PASS":
        raise Skip("the ddp check did not pass" if ddp else "the ddp check did not run")
    if not ddp["sync_bn"]:
        raise Skip("needs >= 2 GPUs for nccl; ddp ran gloo without SyncBN")
    return {"note": f"{ddp['syncbn_layers']} SyncBatchNorm layers under nccl; ranks' weights and BN statistics identical"}


# --------------------------------------------------------------------------- driver

def quiet_numba_finalizers() -> None:
    """Drop the 'Exception ignored ... KeyError' that numba's dispatcher finalizer prints whenever an
    FFCV Loader is collected (harmless, but pages of it would hide the real errors)."""
    default = sys.unraisablehook

    def hook(u):
        tb = u.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if u.exc_type is KeyError and tb is not None and tb.tb_frame.f_code.co_filename.endswith(
                os.path.join("numba", "core", "dispatcher.py")):
            return
        default(u)

    sys.unraisablehook = hook


CHECKS = {"data": check_data, "loader": check_loader, "ffcv_to_device": check_to_device,
          "pretrain_fp32": check_pretrain_fp32, "pretrain_amp_fp16": check_pretrain_fp16,
          "pretrain_amp_bf16": check_pretrain_bf16, "pretrain_accu4": check_pretrain_accu4,
          "probe_published": check_probe_published, "probe_single_pass": check_probe_single_pass,
          "ddp": check_ddp, "syncbn": None}


def run_check(ctx: Ctx, name: str, results: dict) -> dict:
    faulthandler.dump_traceback_later(ctx.args.check_timeout + 60, exit=True)  # a hang: stacks, then exit
    t0 = time.perf_counter()
    try:
        if name != "data" and ctx.train is None:
            raise Skip("no .beton data (the data check failed)")
        shutil.rmtree(ctx.work / name, ignore_errors=True)  # a kept --work dir: never reuse a finished run
        fig = check_syncbn(ctx, results.get("ddp")) if name == "syncbn" else CHECKS[name](ctx)
        res = {"status": "PASS", **fig}
    except Skip as e:
        res = {"status": "SKIP", "note": str(e)}
    except Exception as e:  # noqa: BLE001 - any failure is reported and the next check runs
        traceback.print_exc()
        hint = "; try a smaller --batch" if "out of memory" in str(e).lower() else ""
        res = {"status": "FAIL", "note": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}{hint}"}
    finally:
        faulthandler.cancel_dump_traceback_later()
    res["seconds"] = time.perf_counter() - t0
    if ctx.cuda:
        import torch

        gc.collect()
        torch.cuda.empty_cache()
    print(f"[{res['status']}] {name}: {res['seconds']:.1f} s  {fmt_rate(res)}  {res.get('note', '')}", flush=True)
    return res


def fmt_rate(res: dict) -> str:
    r = res.get("images_per_s")
    return f"{r:,.0f} img/s" if r else "-"


def table(results: dict) -> str:
    lines = [f"{'check':20s} {'status':6s} {'s':>7s} {'img/s':>10s} {'wall img/s':>10s}  note"]
    for name, r in results.items():
        wall = r.get("wall_images_per_s")
        lines.append(f"{name:20s} {r['status']:6s} {r['seconds']:7.1f} {fmt_rate(r).replace(' img/s', ''):>10s} "
                     f"{f'{wall:,.0f}' if wall else '-':>10s}  {r.get('note', '')}")
    return "\n".join(lines)


def provenance(ctx: Ctx) -> dict:
    import torch
    from barlow.provenance import git_commit

    gpu = {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
           "cudnn": torch.backends.cudnn.version()} if ctx.cuda else {"gpu": None}
    return {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
            "commit": git_commit(), "device": ctx.device, **gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "argv": "python -m benchmarks.gpu_smoke " + " ".join(sys.argv[1:])}


def write_record(path: Path, ctx: Ctx, results: dict, complete: bool) -> None:
    a = ctx.args
    settings = {k: getattr(a, k) for k in ("quick", "batch", "probe_batch", "steps", "warmup", "images", "val_images",
                                           "workers", "arch", "image_size", "projector", "data")}
    rec = {**provenance(ctx), "complete": complete, "settings": settings,
           "passed": all(r["status"] != "FAIL" for r in results.values()), "checks": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n")
    tmp.replace(path)


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.split("\n\n")[0],
                                 epilog="checks: " + ", ".join(CHECKS), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda (default; stops with exit 2 when there is no GPU) or cpu (dry run: CUDA checks SKIP)")
    ap.add_argument("--quick", action="store_true", help="small sizes: batch 16, 3 steps (for the CPU dry run)")
    ap.add_argument("--data", help="class folder root (<root>/{train,val}/<class>/<img>) instead of generated images")
    ap.add_argument("--batch", type=int, help="per-GPU pretraining batch, multiple of 8 (default 256; --quick 16)")
    ap.add_argument("--probe-batch", type=int, help="probe batch, even (default 256; --quick 16)")
    ap.add_argument("--steps", type=int, help="optimizer steps per pretraining check (default 20; --quick 3)")
    ap.add_argument("--warmup", type=int, help="steps left out of images/s (default 5; --quick 1)")
    ap.add_argument("--images", type=int, help="train images (default 8 x batch)")
    ap.add_argument("--val-images", type=int, help="val images (default = probe batch)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="FFCV threads (default min(8, cores))")
    ap.add_argument("--arch", help="override the presets' resnet50 (dry runs)")
    ap.add_argument("--image-size", type=int, help="override the presets' 224 px (dry runs)")
    ap.add_argument("--projector", help="override the presets' 8192,8192,8192 projector (dry runs)")
    ap.add_argument("--only", help="comma-separated checks to run (data always runs)")
    ap.add_argument("--out", help=f"JSON record (default on CUDA: {COMMITTED.relative_to(REPO)}; on CPU: a temp dir)")
    ap.add_argument("--work", help="scratch dir for images, .beton files and runs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    ap.add_argument("--check-timeout", type=float, default=1200, help="seconds before a hung check aborts the run")
    a = ap.parse_args(argv)
    q = a.quick
    for k, full, quick in (("batch", 256, 16), ("probe_batch", 256, 16), ("steps", 20, 3), ("warmup", 5, 1)):
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    a.images = a.images or 8 * a.batch
    a.val_images = a.val_images or a.probe_batch
    if a.batch < 8 or a.batch % 8 or a.probe_batch % 2 or a.steps < 2 or not 0 <= a.warmup < a.steps:
        ap.error("--batch must be a multiple of 8, --probe-batch even, --steps >= 2 and 0 <= --warmup < --steps")
    unknown = set((a.only or "").split(",")) - set(CHECKS) - {""}
    if unknown:
        ap.error(f"--only: unknown check(s) {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    quiet_numba_finalizers()
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU found (torch.cuda.is_available() is False); this check needs one. For a CPU dry "
              "run of the same checks: python -m benchmarks.gpu_smoke --device cpu --quick --arch resnet18 "
              "--image-size 32 --projector 256,256,256", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else COMMITTED if a.device == "cuda" else \
        Path(tempfile.mkdtemp(prefix="gpu_smoke_out-")) / "gpu_smoke.json"
    if a.device == "cpu" and out.resolve() == COMMITTED:
        print(f"error: {COMMITTED.relative_to(REPO)} holds GPU figures only; give --out another path", file=sys.stderr)
        return 2
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(a, "cuda:0" if a.device == "cuda" else "cpu", work)
    if ctx.cuda:
        torch.cuda.set_device(0)
    info = provenance(ctx)
    print(f"gpu_smoke: {info['gpu'] or 'CPU dry run'}, torch {info['torch']} (CUDA {info['cuda']}), commit "
          f"{info['commit']}, batch {a.batch}, {a.steps} steps, work dir {work}", flush=True)
    names = [n for n in CHECKS if not a.only or n == "data" or n in a.only.split(",")]
    results: dict = {}
    try:
        for name in names:
            results[name] = run_check(ctx, name, results)
            write_record(out, ctx, results, complete=False)
        write_record(out, ctx, results, complete=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + table(results) + f"\n\nwrote {out}" + (f"; kept {work}" if a.keep else ""))
    failed = [n for n, r in results.items() if r["status"] == "FAIL"]
    print(f"FAILED: {', '.join(failed)}" if failed else "all checks passed (SKIP = not applicable here)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
