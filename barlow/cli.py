"""``python -m barlow <stage>``: every stage runs without the workflow (handy on a login node).

Errors the user can fix (``BadInput``) print as one line, ``error: <input>: <what to do>``, and
exit with status 2; nothing already written is touched.

``pretrain`` and ``probe`` launched to a job (``--executor local|slurm``) import neither torch nor FFCV
here: this process only sizes the job (torch-free estimates, the .beton's header), submits and waits;
the job imports the stage (``StageCall``). ``BARLOW_REPORT_IMPORTS=<file>`` writes the modules this
process imported to that file at exit (tests/test_cli.py checks the launcher's).
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

from barlow import layout
from barlow.errors import BadInput


@dataclasses.dataclass(frozen=True)
class StageCall:
    """``target(*args, **kwargs, env=...)``, the call a stage's job runs (``launch.StageJob``): ``target``
    ("barlow.pretrain:pretrain") is imported only when it runs, in the job. Pickling it imports nothing, so
    the launcher never imports the stage's module (torch, FFCV: seconds a launch); a ``functools.partial``
    of the function is pickled by reference, which needs that import."""

    target: str
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __call__(self, **more):
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(*self.args, **self.kwargs, **more)


def _experiment(args) -> dict:
    from barlow import config

    runtime = _json_arg(args, "runtime_json") or {}
    if args.config_json:
        cfg = _json_arg(args, "config_json")
        cfg = config.deep_merge(cfg, {k: v for k, v in runtime.items() if k in cfg})  # the stage's sections only
        cfg = config.complete(cfg)
    else:
        overrides = config.load_yaml(args.config) if args.config else {}
        cfg = config.resolve(args.preset, config.deep_merge(overrides, runtime))
    return config.smoke(cfg) if getattr(args, "smoke", False) else cfg


def identity(args) -> dict:
    """What the workflow says the stage's outputs belong to (dataset, experiment, seed, weights key), passed
    beside the runtime knobs; the stage writes it into its outputs. {} when run by hand."""
    return dict((_json_arg(args, "runtime_json") or {}).get("identity") or {})


def _job_name(stage: str, ident: dict, passes: list | None = None) -> str:
    """What squeue shows: the stage, the (first) run it is for, and the pass when the job runs one."""
    runs = ident.get("runs") or [layout.run_key(ident["experiment"], ident.get("seed")) if "experiment" in ident
                                 else "run"]
    return "-".join([stage, runs[0].replace("/", "-")] + ([passes[0]["name"]] if passes and len(passes) == 1 else []))


def _json_arg(args, name: str):
    text = getattr(args, name, None)
    if not text:
        return None
    flag = f"--{name.replace('_', '-')}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{flag}: not valid JSON ({e.msg} at character {e.pos}); pass a JSON object, e.g. "
                       "'{\"executor\": \"local\"}'") from None
    if not isinstance(value, dict):
        raise BadInput(f"{flag}: a JSON {type(value).__name__}, expected an object ({{...}})")
    return value


def _launcher(args) -> dict:
    return _json_arg(args, "launcher_json") or {"executor": args.executor}


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment (one of)")
    g.add_argument("--preset", default="fmnist_r18", help="preset name (see `python -m barlow presets`)")
    g.add_argument("--config", help="YAML file of overrides merged onto --preset")
    g.add_argument("--config-json", help="a fully resolved experiment as JSON (what the workflow passes)")
    p.add_argument("--runtime-json", help="runtime knobs merged onto the experiment (workers, checkpoint cadence): "
                                          "JSON, e.g. '{\"pretrain\": {\"workers\": 8}}'")
    p.add_argument("--smoke", action="store_true", help="smoke mode: the preset's code path on a handful of images")
    p.add_argument("--executor", default="inline", choices=["inline", "local", "slurm"],
                   help="where to run (default: this process)")
    p.add_argument("--launcher-json", help="launcher settings as JSON (executor, nodes, partition, ...)")


def cmd_convert(args) -> None:
    from barlow.convert import WriteOptions, convert

    opts = WriteOptions(args.write_mode, args.max_resolution, args.jpeg_quality, args.compress_probability)
    classes = None
    if args.classes_from:
        classes = _classes_from(Path(args.classes_from))
    summary = convert(args.kind, args.path, args.split, args.out, image_size=args.image_size, limit=args.limit,
                      workers=args.workers, options=opts, classes=classes, subset=args.subset,
                      classes_file=args.classes_file)
    from barlow.atomic import write_json

    write_json(Path(args.out).with_suffix(".json"), summary)
    print(f"wrote {args.out}: {summary['images']} images, {len(summary['classes'])} classes")


def _classes_from(path: Path) -> list[str]:
    """The class list of the train split's summary (val must have the same classes)."""
    try:
        classes = json.loads(path.read_text())["classes"]
    except FileNotFoundError:
        raise BadInput(f"--classes-from {path}: no such file; convert the train split first (it writes this "
                       "summary beside its .beton)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BadInput(f"--classes-from {path}: not a conversion summary (no 'classes' list); reconvert the train "
                       "split") from None
    if not isinstance(classes, list):
        raise BadInput(f"--classes-from {path}: 'classes' is not a list; reconvert the train split")
    return classes


def cmd_pretrain(args) -> None:
    from barlow import launch

    cfg, ident = _experiment(args), identity(args) or None
    if _finish_from_checkpoint(cfg, args.out, ident):
        return
    lc = launch.complete(_launcher(args), "pretrain")
    need, hard = _pretrain_memory(cfg, args.train, lc)
    launch.run(StageCall("barlow.pretrain:pretrain", (cfg, args.train, args.out), {"identity": ident}), lc,
               Path(args.out).parent, name=_job_name("pretrain", ident or {}), stage="pretrain", need_mem_gb=need,
               need_why="pretraining (the train .beton's page cache + loaders + checkpoint)",
               expected_hours=_pretrain_hours(cfg, args.train, lc))


def _finish_from_checkpoint(cfg: dict, out: str, ident: dict | None) -> bool:
    """``finish_from_checkpoint`` (which imports torch) only where it could write ``out``: a checkpoint.pt
    beside a missing ``out``. A fresh stage has no checkpoint, a finished one its ``out``: neither imports torch."""
    if Path(out).exists() or not (Path(out).parent / "checkpoint.pt").is_file():
        return False
    from barlow.pretrain_checkpoint import finish_from_checkpoint

    return finish_from_checkpoint(cfg, out, ident)


def _pretrain_memory(cfg: dict, train: str, lc: dict) -> tuple[float | None, float | None]:
    """(need_mem_gb for the launcher, the same without the page cache); a node that cannot cache the
    train .beton is said in one line before anything is submitted."""
    from barlow import preflight
    from barlow.beton_size import of_file
    from barlow.estimate_memory import page_cache_shortfall, pretrain_memory_gb

    if cfg["pretrain"]["init"] == "checkpoint" or not Path(train).is_file():
        return None, None  # pretrain() says what is wrong in its own words
    b = of_file(train)
    kw = dict(nodes=lc["nodes"], tasks_per_node=lc["tasks_per_node"])
    hard = pretrain_memory_gb(cfg, b.images, **kw)
    need = pretrain_memory_gb(cfg, b.images, **kw, beton_bytes=b.bytes)
    slurm_derives = lc["executor"] == "slurm" and not lc.get("mem_gb")
    node = lc.get("mem_gb") or (None if slurm_derives else preflight.machine_mem_gb())
    # only where the node holds the stage but not the file too (less than the stage: the launcher says so)
    line = page_cache_shortfall(node, need, b.gb) if node and node >= hard else None
    if line:
        print(f"warning: {line}", flush=True)  # (stdout, as the launcher's own memory warning)
    # a machine that only cannot cache the file still runs the stage (slower): refuse on the hard need alone
    return (need if slurm_derives else hard), hard


# Sustained TFLOP/s per GPU behind launcher.max_requeues' expected wall time: conservative
# (V100-class mixed precision; estimate's default is 150), so the derived limit errs towards more requeues.
REQUEUE_TFLOPS = 30.0


def _pretrain_hours(cfg: dict, train: str, lc: dict) -> float | None:
    """Pretraining's expected wall time on the job's GPUs: barlow.estimate's pretrain ``wall_hours``, from its
    FLOPs alone (``estimate()`` sizes GPU memory too, on the meta device: torch); None where that means
    nothing: not on SLURM, or no GPUs (estimate models GPU throughput only)."""
    if lc["executor"] != "slurm" or not lc.get("gpus_per_node") or not Path(train).is_file():
        return None
    from barlow.beton_size import images_in
    from barlow.config import complete
    from barlow.estimate import FP32_RATIO, pretrain_flops_per_image, pretrain_steps

    cfg = complete(cfg)
    p = cfg["pretrain"]
    if p["init"] == "checkpoint":
        return 0.0
    n = images_in(train)
    steps = pretrain_steps(p, min(n, p["limit_train"]) if p["limit_train"] else n)
    rate = REQUEUE_TFLOPS * 1e12 * (FP32_RATIO if p["precision"] == "fp32" else 1.0)
    return steps * p["batch_size"] * pretrain_flops_per_image(cfg) / rate / 3600 / (lc["nodes"] * lc["tasks_per_node"])


def cmd_probe(args) -> None:
    from barlow import launch
    from barlow.beton_size import images_in
    from barlow.estimate_memory import probe_memory_gb

    cfg = _experiment(args)
    if "probe" not in cfg:
        raise BadInput("experiment: has no probe section; use a preset with one or add probe: to the overrides")
    lc = launch.complete(_launcher(args), "probe")
    need = probe_memory_gb(cfg, images_in(args.train), images_in(args.val), nodes=lc["nodes"],
                           tasks_per_node=lc["tasks_per_node"])
    out = Path(args.out)
    launch.run(StageCall("barlow.probe:run_probes", (cfg, args.backbone, args.train, args.val, args.out),
                                {"identity": identity(args) or None}), lc,
               Path(layout.pass_job_dir(str(out))), name=_job_name("probe", identity(args), cfg["probe"]["passes"]),
               stage="probe", need_mem_gb=need,
               need_why="the probe (cached features in float16 + loader)")


def cmd_finetune(args) -> None:
    from barlow import launch

    cfg = _experiment(args)
    lc = launch.complete(_launcher(args), "finetune")
    call = StageCall("barlow.finetune:run_finetune", (cfg, args.backbone, args.train, args.val, args.out, args.percent),
                     {"identity": identity(args) or None})
    # a job folder per percent: the 1 % and 10 % fine-tunes of a run share a folder and run side by side
    launch.run(call, lc, Path(layout.finetune_job_dir(args.out)), name=f"{_job_name('finetune', identity(args))}-{args.percent:g}pc",
               stage="finetune")


def cmd_merge_probes(args) -> None:
    from barlow.probe_merge import merge_passes

    merge_passes(args.parts, args.out)


def cmd_report(args) -> None:
    from barlow.report import report

    runs = args.runs
    if args.runs_json:
        try:
            runs = json.loads(args.runs_json)
        except json.JSONDecodeError as e:
            raise BadInput(f"--runs-json: not valid JSON ({e.msg} at character {e.pos})") from None
    report(runs, args.out_dir, provenance=json.loads(args.provenance_json) if args.provenance_json else {},
           reference=args.reference)


def cmd_presets(args) -> None:
    from barlow import config

    for name in config.preset_names():
        cfg = config.load_preset(name)
        print(f"{name:28s} {cfg.get('description', '')}")


def cmd_estimate(args) -> None:
    from barlow.estimate_report import print_estimate

    cfg, beton = _experiment(args), None
    if args.dataset:  # the page cache from the converted files, else from a converted sample of the images
        from barlow import beton_size, config

        beton = beton_size.for_workflow_dataset(args.dataset, args.workflow_config, sample=args.sample)
        entry = config.load_yaml(args.workflow_config)["datasets"][args.dataset]
        cfg = config.apply_dataset(cfg, entry, f"--dataset {args.dataset}")
    print_estimate(cfg, images=args.images, gpu_tflops=args.gpu_tflops, gpus=args.gpus,
                   probe_gpus=args.probe_gpus or args.gpus, gpus_per_node=args.gpus_per_node, beton=beton,
                   finetune=args.finetune or None)


def cmd_status(args) -> None:
    from barlow.status import show

    show(args.config, smoke=args.smoke, watch=args.watch)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m barlow", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _stage_commands(sub)  # along the workflow: convert -> pretrain -> probe (-> merge-probes), finetune -> report
    _tool_commands(sub)
    return ap


def _stage_commands(sub) -> None:
    from barlow.convert import IMAGE_SIZE

    p = sub.add_parser("convert", help="image dataset -> FFCV .beton", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kind", required=True, help="fashion_mnist | image_folder | cifar10 | cifar100")
    p.add_argument("--path", required=True, help="dataset root (image_folder: holds train/ and val/; cifar10/cifar100: "
                                                 "the extracted cifar-10-batches-py / cifar-100-python folder)")
    p.add_argument("--split", required=True, choices=["train", "val"])
    p.add_argument("--out", required=True, help=".beton to write (a .json summary is written beside it)")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="Fashion-MNIST: pad 28 px to this side")
    p.add_argument("--limit", type=int, help="convert only the first N images (tiny test sets)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--write-mode", default="raw", choices=["raw", "jpg", "proportion", "smart"])
    p.add_argument("--max-resolution", type=int, help="longest side kept (FFCV authors: 500 for ResNet-50)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-probability", type=float, default=0.5)
    p.add_argument("--classes-from", help="the train split's .json: val must have the same classes")
    p.add_argument("--subset", help="image_folder: keep only a shipped class list (imagenet100)")
    p.add_argument("--classes-file", help="image_folder: keep only the class folders listed in this file, one a line")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("pretrain", help="Barlow Twins pretraining -> backbone.pth", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_experiment_args(p)
    p.add_argument("--train", required=True, help="train .beton")
    p.add_argument("--out", required=True, help="backbone weights to write; checkpoint.pt and metrics.csv go beside it")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("probe", help="linear probes F1-F5 + AvgPool -> probes.json", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_experiment_args(p)
    p.add_argument("--backbone", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--out", required=True, help="probes.json to write")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("finetune", help="semi-supervised fine-tune on a percent of the train labels -> finetune.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_experiment_args(p)
    p.add_argument("--backbone", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--percent", required=True, type=_percent, help="percent of the train labels (1 or 10: SimCLR's "
                   "ImageNet lists; otherwise, or for other datasets, a class-balanced subset; finetune.subset)")
    p.add_argument("--out", required=True, help="JSON to write (val top-1/top-5 of the final epoch); the subset file "
                                                "and the resume checkpoint go beside it")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge-probes", help="the passes of one experiment (probes/<pass>.json) -> probes.json")
    p.add_argument("--parts", nargs="+", required=True, help="one JSON per pass, written by `probe`")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge_probes)

    p = sub.add_parser("report", help="probes.json files -> benchmark.md/.csv + plots")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--runs", nargs="+", help="probes.json files, one per table row (each carries its identity)")
    g.add_argument("--runs-json", help="what the workflow passes: a JSON list of {probes, dataset, experiment, seed, "
                                       "metrics, preset} per row")
    p.add_argument("--out-dir", default="results")
    p.add_argument("--provenance-json", help="extra provenance (machine, config file) as JSON")
    p.add_argument("--reference", nargs="*", default=[], help="probes.json of reference runs (e.g. committed long "
                   "runs, with their random-init row): their online kNN curve and crossing step are drawn and noted "
                   "beside this table, not as rows")
    p.set_defaults(func=cmd_report)


def _percent(text: str) -> float:
    """--percent as a number in (0, 100]; 1 and 10 as ints, the keys of SimCLR's lists."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text}: a percent must lie in (0, 100]")
    return int(value) if value.is_integer() else value


def _tool_commands(sub) -> None:
    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("estimate", help="compute estimate (GPU-hours) of an experiment before submitting it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_experiment_args(p)
    p.add_argument("--images", type=int, help="train images (default: the dataset's known size)")
    p.add_argument("--gpu-tflops", type=float, default=150.0, help="sustained mixed-precision TFLOP/s per GPU")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the pretraining job")
    p.add_argument("--probe-gpus", type=int, help="GPUs (tasks) of each probe job (default: --gpus)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--dataset", help="a datasets: entry of --workflow-config: size the page cache from its converted "
                                     ".beton files, else from a sample of its images converted now (cached)")
    p.add_argument("--workflow-config", default="config.yaml", help="the workflow config naming --dataset")
    p.add_argument("--sample", type=int, default=256, help="images converted to measure a dataset not yet converted")
    p.add_argument("--finetune", action="store_true", help="add the semi-supervised fine-tunes (finetune.fractions, "
                                                          "on --probe-gpus), as for an experiment with finetune: true")
    p.set_defaults(func=cmd_estimate)

    from barlow.status import columns_help  # (the module imports neither torch nor FFCV)

    p = sub.add_parser("status", help="where each run of a workflow config stands (stage, step, ETA, job), from "
                       "its files", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="One row per run of the config (an experiment, or one seed of it), read from "
                       "the run's files, logs and job record; nothing is written.",
                       epilog=columns_help())
    p.add_argument("--config", default="config.yaml", help="the workflow config (as snakemake's --configfile; "
                   "default: config.yaml)")
    p.add_argument("--smoke", action="store_true", help="the smoke-mode runs of that config (<results>/smoke/)")
    p.add_argument("--watch", nargs="?", type=float, const=10.0, metavar="SECONDS",
                   help="print the table again every SECONDS (default 10) until Ctrl-C")
    p.set_defaults(func=cmd_status)


def _report_imports(path: str) -> None:
    Path(path).write_text("\n".join(sorted(sys.modules)) + "\n")


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("BARLOW_REPORT_IMPORTS"):
        atexit.register(_report_imports, os.environ["BARLOW_REPORT_IMPORTS"])
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0
