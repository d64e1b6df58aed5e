"""The probe stage: linear probes on a frozen backbone, Feature1..5 (stem, layer1..4) and AvgPool.

The heads and their pooling are in ``barlow.heads``, their training loops in ``barlow.fit``, the
feature extraction in ``barlow.features``, the resume checkpoint in ``barlow.probe_resume`` and the
merge of a run's passes into one probes.json in ``barlow.probe_merge``.

A probe run is a list of *passes*. Each pass has its train/eval augmentation and trains some heads,
each with its own optimizer and schedule. ``cached: true`` extracts the (pooled) frozen features once
and trains on them (valid only without train augmentation: the fast single-pass protocol); otherwise
the backbone runs every epoch, as in the published protocols.

Devices. The heads live on the compute device (``env.device``); cached features stay in host
memory as float16, and every consumer moves its batch to the heads' device itself, so a loader may
deliver batches on any device. tests/test_probe.py runs the whole probe with compute on PyTorch's
``meta`` device and CPU batches: a missing move raises there.

Several processes (``env.world > 1``, one per device) split every global batch (``barlow.fit``), so
a run's heads do not depend on the number of processes (up to float rounding). Heads are wrapped in
DistributedDataParallel; their BatchNorm uses the statistics of the global batch; evaluation is
sharded too and the correct counts summed. Only rank 0 writes files.

Resuming (``barlow.probe_resume``). Rank 0 writes ``<output stem>.checkpoint.pt`` beside the output;
a rerun resumes from it and ends with the very heads of an unbroken run (tests/test_probe_resume.py).

kNN. A pass with the AvgPool head also reports the weighted kNN top-1 (``barlow.knn``: cosine,
T = 0.07, k = 20 and 200) of the val AvgPool features against the (used) train ones, unaugmented:
the cached features themselves, or one extra eval-view extraction of the train set after an
augmented pass. With several processes each rank all-gathers the others' shards and computes it.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from barlow.atomic import write_json
from barlow.augment import views_from_config
from barlow.checkpoint import load_backbone
from barlow.config import complete
from barlow import distributed
from barlow.distributed import Env
from barlow.errors import BadInput
from barlow.features import eval_view, extract, train_view
from barlow.ffcv_import import import_ffcv
from barlow.fit import count_correct, fit_augmented, fit_cached, top1
from barlow.heads import Probes, make_trainers
from barlow.knn import KS, TEMPERATURE, knn_record
from barlow.loader import beton_length
from barlow.model import backbone as make_backbone
from barlow.probe_resume import Checkpointer, checkpoint_path
from barlow.provenance import git_commit


@dataclasses.dataclass
class _Run:
    """What every pass of one probe run shares."""

    cfg: dict
    env: Env
    log: Callable
    t0: float
    weights: object  # barlow.weights.Loaded
    probes: Probes
    train: str | Path
    val: str | Path
    train_idx: list[int] | None
    n_used: int
    n_val: int
    classes: int
    mean: tuple
    std: tuple
    loader_device: str
    ckpt: Checkpointer

    @property
    def device(self) -> torch.device:
        return torch.device(self.env.device)


def run_probes(cfg: dict, backbone_path: str | Path, train: str | Path, val: str | Path, out: str | Path,
               env: Env | None = None, log=print, identity: dict | None = None) -> dict:
    """Train every pass's heads and write top-1 (val) per head to ``out`` (JSON).

    ``env`` (rank, world, local_rank, device; default: one process on the CPU) sets where the
    heads compute and how the data is split; with ``world > 1`` the process group must exist
    (``barlow.distributed.setup``). On the ``meta`` device (the device test) top-1 is NaN.
    Resumes from ``checkpoint_path(out)`` when a killed run left one. ``identity`` (dataset, experiment,
    seed, weights key: what the workflow says this result is) is written into ``out`` as given.
    """
    t0 = time.time()
    env = env or Env()
    if not env.main:
        log = _quiet
    out = Path(out)
    run = _prepare(complete(cfg), backbone_path, train, val, out, env, log, t0)
    passes = run.cfg["probe"]["passes"]
    results, dims = {}, run.probes.dims()
    knn = None  # the kNN result of the pass with the AvgPool head
    state = run.ckpt.load()
    first = 0
    if state is not None:
        results, first, knn = dict(state["results"]), state["pass"], state.get("knn")
        torch.set_rng_state(state["rng"])
        run.ckpt.wall_before = state.get("wall_s", 0.0)
        log(f"resuming the probes from {run.ckpt.path}: pass {first + 1}/{len(passes)}, step {state['step']}")
    for p_i, pcfg in enumerate(passes):
        if p_i < first:
            continue
        knn = _run_pass(run, p_i, pcfg, results, knn, state)
        if p_i + 1 < len(passes):
            run.ckpt.save(p_i + 1, results, torch.get_rng_state(), None, 0, None, t0, knn)
    summary = _summary(run, backbone_path, results, dims, knn)
    if identity:
        summary["identity"] = dict(identity)
    if env.main:
        write_json(out, summary)
        run.ckpt.path.unlink(missing_ok=True)
    return summary


def _prepare(cfg: dict, backbone_path, train, val, out: Path, env: Env, log, t0: float) -> _Run:
    """Check the passes, load the backbone, size the data and seed torch: everything before the first pass."""
    device = torch.device(env.device)
    # FFCV's ToDevice only where it pays (CUDA); any other device gets CPU batches that the
    # consumers move (which is also what the meta-device test exercises).
    loader_device = env.device if device.type == "cuda" else "cpu"
    m, pc = cfg["model"], cfg["probe"]
    if device.type == "cuda":
        distributed.fp32_math(cfg["pretrain"]["tf32"])  # the backbone's forward computes as pretraining's did
    for i, pcfg in enumerate(pc["passes"]):
        if pcfg["batch_size"] % env.world:
            raise BadInput(f"probe.passes[{i}].batch_size {pcfg['batch_size']}: not divisible by the {env.world} "
                           f"processes (nodes x devices); choose a multiple of {env.world}")
    weights = _load_weights(cfg, backbone_path)
    net = make_backbone(m["arch"])
    net.load_state_dict(weights.state_dict)
    size = cfg["data"]["image_size"]
    probes = Probes(net, size, pc["pooling"]).to(device)
    v1 = views_from_config(cfg)[0]  # the probes normalise as pretraining did
    n_train, n_val = beton_length(train), beton_length(val)
    limit = pc["limit_train"]
    train_idx = list(range(min(n_train, limit))) if limit else None
    n_used = len(train_idx) if train_idx else n_train
    classes = _num_classes(train, val)
    ckpt = Checkpointer(checkpoint_path(out), cfg, backbone_path, env, pc["checkpoint_every_steps"], sha=weights.sha256)
    torch.manual_seed(pc["seed"])
    return _Run(cfg, env, log, t0, weights, probes, train, val, train_idx, n_used, n_val, classes, v1.mean, v1.std,
                loader_device, ckpt)


def _run_pass(run: _Run, p_i: int, pcfg: dict, results: dict, knn: dict | None, state: dict | None) -> dict | None:
    """Train and evaluate pass ``p_i``'s heads (resuming from ``state`` where it is this pass's);
    its top-1 go into ``results``. Returns the run's kNN result (this pass's if it has the AvgPool head)."""
    env, log, ckpt = run.env, run.log, run.ckpt
    rng_at_start = torch.get_rng_state()  # head init draws from it: a resumed pass re-draws the same
    trainers = make_trainers(run.probes, pcfg, run.classes, run.device)
    resume = state if state is not None and state["pass"] == p_i and state.get("heads") else None
    if resume is not None:
        for t in trainers:
            t.head.load_state_dict(resume["heads"][t.name])
            t.opt.load_state_dict(resume["optimizers"][t.name])
    for t in trainers:
        t.model = distributed.wrap(t.head, env)  # (GlobalBatchNorm2d keeps the ranks' running stats equal)

    def save(step: int, steps_per_epoch: int, gen=None, trainers=trainers, p_i=p_i, rng=rng_at_start) -> None:
        """Checkpoint after optimizer step ``step`` of this pass if it is due (every N steps, epoch end)."""
        if step % ckpt.every == 0 or step % steps_per_epoch == 0:
            ckpt.save(p_i, results, rng, trainers, step, gen, run.t0, knn)

    heads = [t.name for t in trainers]
    feats_tr, y_tr, feats_va, y_va = _train(run, pcfg, trainers, resume, save)
    for t in trainers:
        results[t.name] = top1(count_correct(t.head, feats_va[t.name], y_va), run.n_val, env)
    log(f"[{pcfg['name']}] top-1: " + ", ".join(f"{k} {results[k]:.2f}" for k in heads))
    if "avgpool" in heads:
        knn = knn_record(feats_tr["avgpool"], y_tr, feats_va["avgpool"], y_va, run.n_used, run.n_val, env,
                         run.device)
        log(f"[{pcfg['name']}] kNN top-1 (AvgPool, k={KS[0]}, T={TEMPERATURE}, bank {run.n_used}): "
            f"{knn['top1']:.2f} (k={KS[1]}: {knn['top1_k200']:.2f})")
    return knn


def _train(run: _Run, pcfg: dict, trainers, resume, save):
    """Fit one pass's heads; returns the train features of the kNN bank (None without the AvgPool head
    in an augmented pass) and labels, and the val features and labels."""
    from barlow.augment import BatchAugment

    cfg, env, log, device, size = run.cfg, run.env, run.log, run.device, run.cfg["data"]["image_size"]
    seed, workers = cfg["probe"]["seed"], cfg["probe"]["workers"]
    tr_aug = BatchAugment(train_view(size, pcfg.get("augment", {}), run.mean, run.std)).to(device)
    ev_aug = BatchAugment(eval_view(size, pcfg.get("eval_augment", {}), run.mean, run.std)).to(device)
    heads = [t.name for t in trainers]
    decode = "simple" if cfg["pretrain"]["decode"] == "simple" else "rrc"
    eval_decode = "simple" if decode == "simple" else "center"
    shared = dict(heads=heads, aug=ev_aug, pcfg=pcfg, workers=workers, seed=seed, env=env,
                  loader_device=run.loader_device, decode=eval_decode, size=size)  # all but path, indices
    feats_tr = y_tr = None
    if pcfg["cached"]:
        log(f"[{pcfg['name']}] extracting frozen features once for {heads}")
        t_ex = time.time()
        feats_tr, y_tr = extract(run.probes, run.train, indices=run.train_idx, **shared)
        feats_va, y_va = extract(run.probes, run.val, indices=None, **shared)
        log(f"[{pcfg['name']}] extracted {run.n_used} train + {run.n_val} val in {time.time() - t_ex:.0f} s")
        fit_cached(trainers, feats_tr, y_tr, pcfg["batch_size"], seed, log, env=env, n=run.n_used,
                   resume=resume, save=save)
    else:
        fit_augmented(trainers, run.probes, tr_aug, run.train, run.train_idx, run.n_used, pcfg, seed, workers,
                      decode, size, env, run.loader_device, log, resume, save)
        feats_va, y_va = extract(run.probes, run.val, indices=None, **shared)
        if "avgpool" in heads:
            # The kNN bank must be unaugmented: one more eval-view pass over the train set (at
            # ImageNet's published protocol, ~1% of the AvgPool job's 100 epochs of forwards).
            feats_tr, y_tr = extract(run.probes, run.train, indices=run.train_idx, **{**shared, "heads": ["avgpool"]})
    return feats_tr, y_tr, feats_va, y_va


def _summary(run: _Run, backbone_path, results: dict, dims: dict, knn: dict | None) -> dict:
    """The output JSON of a probe run: its top-1 per head, kNN, and where the backbone came from."""
    cfg, weights, blob = run.cfg, run.weights, run.weights.info
    return {
        "protocol": cfg["probe"]["protocol"], "top1": results, "dims": {k: dims[k] for k in results},
        "backbone": str(backbone_path), "pretrain_epochs": blob.get("epochs"), "pretrain_steps": blob.get("steps"),
        "pretrain_wall_s": blob.get("wall_s"), "pretrain_commit": blob.get("commit"),
        "pretrain_precision": blob.get("precision"), "init": cfg["pretrain"]["init"],
        "backbone_format": weights.format, "backbone_sha256": weights.sha256,
        "train_images": run.n_used, "val_images": run.n_val, "seed": cfg["probe"]["seed"], "knn": knn,
        "probe_wall_s": round(run.ckpt.wall_before + time.time() - run.t0, 1), "probe_commit": git_commit(),
        "config": cfg,
    }


def _load_weights(cfg: dict, backbone_path):
    """The backbone to probe: our backbone.pth, or (``pretrain.init: checkpoint``) a published checkpoint
    in any format ``barlow.weights`` reads; both loaded safely (weights_only), both checked tensor by tensor."""
    from barlow.weights import Loaded, load_weights, sha256

    arch = cfg["model"]["arch"]
    if cfg["pretrain"]["init"] == "checkpoint":
        ck = cfg["pretrain"]["checkpoint"]
        return load_weights(backbone_path, arch, ck["format"], ck["trust_checkpoint"])
    blob = load_backbone(backbone_path, arch)
    info = {k: v for k, v in blob.items() if k not in ("state_dict", "config")}
    return Loaded(blob["state_dict"], "barlow", sha256(backbone_path), info)


def _quiet(*args, **kwargs) -> None:
    """The log of ranks > 0: rank 0 speaks for all."""


def _num_classes(train, val) -> int:
    import_ffcv()
    from ffcv.reader import Reader

    def labels(path):
        r = Reader(str(path))
        return r.metadata[f"f{r.field_names.index('label')}"]

    tr, va = labels(train), labels(val)
    # The converter writes a summary beside each .beton; where both exist, their classes must agree.
    summaries = [Path(p).with_suffix(".json") for p in (train, val)]
    if all(p.is_file() for p in summaries):
        import json

        a, b = (json.loads(p.read_text()).get("classes") for p in summaries)
        if a != b:
            raise BadInput(f"{val}: its classes ({len(b)}: {', '.join(b[:3])}...) differ from {train}'s "
                           f"({len(a)}: {', '.join(a[:3])}...); train and val must come from one dataset — reconvert")
    if va.max() > tr.max():
        raise BadInput(f"{val}: has label {int(va.max())} but {train} only goes to {int(tr.max())}; "
                       "train and val come from different datasets — reconvert both")
    return int(tr.max()) + 1
