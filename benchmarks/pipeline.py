"""Figures ``stage_overhead_s`` and (with ``--with-pipeline``) ``default_pipeline_s``.

Per-stage wall time comes from the rules' ``benchmark:`` files, which Snakemake writes for every job:
``<results>/benchmarks/<rule>/<name>.tsv`` (the report's: ``<results>/benchmarks/report.tsv``;
workflow/rules/*.smk). Column used: ``s``, the job's wall-clock seconds (Snakemake's timer around the
rule's shell command; 0.01 s resolution). The rule is the TSV's folder. Which outputs a TSV's job wrote
is looked up, not parsed out of its name: the names the rules give the jobs of the run's config are
built from the workflow's own definitions (``barlow.config.experiments``, ``barlow.layout``) and matched.
The work a stage itself reports is subtracted:

* pretrain: ``wall_s`` stored in backbone.pth (barlow.pretrain: from after the model is built to the
  save; 0 for a random-init backbone, whose job is therefore a pure no-op through the launch path);
* probe (one pass): ``probe_wall_s`` in probes/<pass>.json (barlow.probe.run_probes from start to the JSON);
* merge_probes: merging the passes, re-timed in-process;
* convert and report print no timing: their work is timed here by calling ``barlow.convert.convert`` /
  ``barlow.report.report`` in this process with the same arguments (imports already warm).

overhead = stage wall - own work = interpreter start + imports + CLI + submitit local executor
(pickle, child process, the launcher's polling). Snakemake's bookkeeping between jobs is outside a
job's ``s`` (the log's timestamps, read before, included part of it); the whole run's wall, which
includes it, gives ``mean_overhead_from_total_wall_s``.

The overhead is also measured directly, with a no-op stage (a random-init pretrain, which only
builds and saves a ResNet-18) through each layer of the launch path: ``python -c pass``, ``import
torch``, ``python -m barlow presets``, ``python -m barlow pretrain --executor inline``, the same through
submitit's local executor (``launcher.poll_s`` 2.0, the default before commit 28c9068, and 0.1, the local default since), plus ``snakemake -n`` on
the workflow (parse, validate, DAG) and a re-run with nothing to do.

Default run and ``--quick``: a tiny config (the repo's config.yaml on 384 train / 256 val images, one epoch,
cached probes: ``tiny_config``).
``--with-pipeline``: additionally the default pipeline end to end (the repo's config.yaml in a fresh
temporary workdir, ``snakemake --cores 2``; ~15 min), whose per-stage overheads then give the figure.

``python -m benchmarks.pipeline --read WORKDIR``: only the per-stage table of a finished run (WORKDIR
holds its config.yaml and results), as JSON; runs nothing but the in-process re-timings above.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import REPO, base_parser, cache_dir, emit, figure, load, log, median

PY = sys.executable
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
STAGES = ("convert", "pretrain", "probe", "merge_probes", "report")  # the rules, in the order they run
TARGET_S = 3.0  # worst stage overhead (issue 24; it was 5 s before)


def tiny_config(results: str = "results") -> dict:
    """The repo's config.yaml (its dataset and experiments) at a tiny size: 384 train / 256 val images, one
    pretraining epoch of batch 64, one cached probe pass of 3 epochs, one FFCV worker."""
    from barlow.config import deep_merge

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["results"] = results
    cfg.pop("reference", None)  # committed reference rows of the real run: not this run's
    for ds in cfg["datasets"].values():
        ds.update(limit_train=384, limit_val=256, workers=1)
    heads = ["feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"]
    tiny = {"pretrain": {"epochs": 1, "batch_size": 64, "workers": 1},
            "probe": {"workers": 1, "passes": [{"name": "all_heads", "cached": True, "heads": heads, "epochs": 3,
                                                "batch_size": 64, "optimizer": "adamw", "lr": 0.001}]}}
    for exp in cfg["experiments"].values():
        exp["overrides"] = deep_merge(exp.get("overrides") or {}, copy.deepcopy(tiny))
    return cfg


def snakemake(workdir: Path, *extra: str, timeout: int = 3600) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
           str(workdir / "config.yaml"), "--cores", "2", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r, time.perf_counter() - t0


def workflow_jobs(cfg: dict, workdir: Path) -> tuple[str, dict[tuple[str, str], dict]]:
    """The run's results folder, and (rule, name of its benchmark file without .tsv) -> where that job's
    outputs are, for every job the workflow makes of ``cfg``. Runs, datasets and paths come from the
    workflow's own definitions (``barlow.config.experiments``, ``barlow.layout``, as workflow/rules/common.smk
    takes them) and the names are those of the rules' ``benchmark:`` lines: ``{dataset}_{split}`` (convert),
    the weights folder below the results (pretrain), ``{dataset}_{exp}_{pass_}`` (probe),
    ``{dataset}_{exp}`` (merge_probes), ``report``."""
    from barlow import config as bc
    from barlow import layout
    from barlow.identity import pass_names

    wf = bc.validate_workflow(copy.deepcopy(cfg))  # the defaults filled in, as the workflow does
    smoke = bc.is_smoke(wf.get("smoke", False))
    results = layout.results_dir(str(workdir / wf["results"]), smoke)
    runs = bc.experiments(wf, smoke)
    weights = bc.weights_folders(results, runs)
    jobs: dict[tuple[str, str], dict] = {}
    for ds, spec in bc.datasets(wf, smoke).items():
        for split in ("train", "val"):
            jobs[("convert", f"{ds}_{split}")] = {"dataset": spec, "split": split}
    report_runs = []
    for k, r in runs.items():
        w = weights.get(k)  # (None: a released checkpoint, no pretraining job)
        if w is not None:
            jobs[("pretrain", os.path.relpath(w.dir, results))] = {"dir": w.dir}
        parts = [layout.pass_file(results, r.dataset, k, name) for name in pass_names(r.cfg)]
        for name, part in zip(pass_names(r.cfg), parts):
            jobs[("probe", f"{r.dataset}_{k}_{name}")] = {"file": part}
        jobs[("merge_probes", f"{r.dataset}_{k}")] = {"parts": parts}
        report_runs.append({"probes": layout.probes_file(results, r.dataset, k), "dataset": r.dataset,
                            "experiment": r.experiment, "seed": r.seed,
                            "metrics": os.path.join(w.dir, "metrics.csv") if w else None})
    jobs[("report", "report")] = {"runs": report_runs}
    return results, jobs


def benchmark_file(results_dir: str | Path, rule: str, name: str) -> Path:
    """Where a job's ``benchmark:`` line writes (workflow/rules/*.smk): <results>/benchmarks/<rule>/<name>.tsv,
    the report's directly in benchmarks/."""
    bdir = Path(results_dir) / "benchmarks"
    return bdir / "report.tsv" if rule == "report" else bdir / rule / f"{name}.tsv"


def read_benchmarks(results_dir: Path, jobs) -> list[dict]:
    """One row per job of ``jobs`` ((rule, name) pairs, ``workflow_jobs``) whose benchmark file exists: rule,
    name and the TSV's columns. Column used for the figures: ``s`` (wall seconds); ``max_rss`` (MB) and
    ``cpu_time`` (s) are kept beside it. A rule with ``repeat(...)`` writes one line per repetition: the
    median is taken (the rules use none)."""
    rows = []
    for rule, name in jobs:
        tsv = benchmark_file(results_dir, rule, name)
        if not tsv.is_file():
            continue
        with open(tsv, newline="") as f:
            lines = list(csv.DictReader(f, delimiter="\t"))
        if not lines:
            continue

        def col(key):
            vals = [float(x[key]) for x in lines if x.get(key) not in (None, "", "NA", "-")]
            return median(vals) if vals else None

        rows.append({"rule": rule, "name": name, "wall_s": col("s"), "max_rss_mb": col("max_rss"),
                     "cpu_time_s": col("cpu_time")})
    order = {r: i for i, r in enumerate(STAGES)}
    return sorted(rows, key=lambda r: (order.get(r["rule"], len(order)), r["name"]))


def own_work(rule: str, job: dict, scratch: Path) -> tuple[float | None, str]:
    """Seconds of work the stage itself did (see the module docstring), and where the number came from;
    ``job``: where its outputs are (``workflow_jobs``)."""
    import torch

    if rule == "pretrain":
        run = Path(job["dir"])
        blob = torch.load(run / "backbone.pth", map_location="cpu", weights_only=False)
        # an untrained backbone's only work is the online monitor's step-0 evaluation (its metrics.csv row):
        # the random-init baseline, real work, not launch overhead; a trained run's wall_s includes its own
        monitor = 0.0
        if (run / "metrics.csv").is_file():
            with open(run / "metrics.csv", newline="") as f:
                monitor = sum(float(r["monitor_s"] or 0.0) for r in csv.DictReader(f) if r["step"] == "0")
        return float(blob.get("wall_s") or 0.0) + monitor, "backbone.pth wall_s + the step-0 monitor row's monitor_s"
    if rule == "probe":  # one pass
        return float(json.loads(Path(job["file"]).read_text())["probe_wall_s"]), "probes/<pass>.json probe_wall_s"
    if rule == "merge_probes":
        from barlow.probe_merge import merge_passes

        t0 = time.perf_counter()
        merge_passes(job["parts"], scratch / "probes.json")
        return time.perf_counter() - t0, "barlow.probe_merge.merge_passes re-timed in-process"
    if rule == "convert":
        from barlow.convert import IMAGE_SIZE, convert

        ds, split = job["dataset"], job["split"]
        t0 = time.perf_counter()
        convert(ds["kind"], ds["path"], split, scratch / f"convert_{split}.beton",
                image_size=ds.get("image_size") or IMAGE_SIZE, limit=ds.get(f"limit_{split}"), workers=ds["workers"])
        return time.perf_counter() - t0, "barlow.convert.convert re-timed in-process"
    if rule == "report":
        from barlow.report import report

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # (it prints the table; stdout may carry this module's JSON)
            report(job["runs"], scratch / "report", provenance={"config_file": "config.yaml"})
        return time.perf_counter() - t0, "barlow.report.report re-timed in-process"
    return None, "unknown"


def stage_table(workdir: Path, cfg: dict, scratch: Path) -> list[dict]:
    """The per-stage rows of the finished run in ``workdir``: wall from its benchmark files, own work, overhead."""
    results, jobs = workflow_jobs(cfg, workdir)
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in read_benchmarks(Path(results), jobs):
        own, src = own_work(b["rule"], jobs[(b["rule"], b["name"])], scratch)
        rows.append({"rule": b["rule"], "job": b["name"], "wall_s": round(b["wall_s"], 2),
                     "own_work_s": None if own is None else round(own, 2), "own_work_from": src,
                     "overhead_s": None if own is None else round(b["wall_s"] - own, 2),
                     "max_rss_mb": b["max_rss_mb"], "cpu_time_s": b["cpu_time_s"]})
    return rows


def run_workflow(cfg: dict, scratch: Path, tag: str, timeout: int) -> tuple[dict, list[dict], float]:
    wd = Path(tempfile.mkdtemp(prefix=f"wf-{tag}-", dir=scratch))
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    log(f"snakemake --cores 2 in {wd} ({tag}) ...")
    r, wall = snakemake(wd, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"snakemake failed ({tag}):\n{r.stderr[-3000:]}")
    log(f"  finished in {wall:.1f} s")
    rows = stage_table(wd, cfg, wd / "_scratch")
    return {"workdir": str(wd), "wall_s": round(wall, 1), "returncode": r.returncode}, rows, wall


def timed(cmd: list[str], cwd: Path, env=None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{r.stderr[-2000:]}")
    return dt


def decomposition(work: Path, train_beton: Path, reps: int, tiny_wd: Path | None) -> dict:
    """Each layer of the launch path, timed with a no-op stage (a random-init pretrain)."""
    from barlow import config as bc

    # (monitor off: its random-init evaluation is work, not launch overhead)
    cfg = bc.resolve("fmnist_r18", {"pretrain": {"init": "random", "monitor": {"enabled": False}}})
    cfg["data"]["image_size"] = 32
    cfg_json = json.dumps({k: cfg[k] for k in ("model", "data", "pretrain")})
    counter = [0]

    def noop(launcher: dict | None):
        counter[0] += 1
        out = work / f"noop{counter[0]}" / "backbone.pth"
        cmd = [PY, "-m", "barlow", "pretrain", "--config-json", cfg_json, "--train", str(train_beton), "--out", str(out)]
        cmd += ["--launcher-json", json.dumps(launcher)] if launcher else ["--executor", "inline"]
        return lambda: timed(cmd, work)

    probes = {
        "python_startup_s": lambda: timed([PY, "-c", "pass"], work),
        "import_torch_s": lambda: timed([PY, "-c", "import torch"], work),
        "barlow_cli_presets_s": lambda: timed([PY, "-m", "barlow", "presets"], work),
        "noop_stage_inline_s": None,
        "noop_stage_submitit_local_poll2_s": None,
        "noop_stage_submitit_local_poll0.1_s": None,
    }
    runs: dict[str, list[float]] = {k: [] for k in probes}
    for _ in range(reps):  # interleaved, so drifting load hits every layer alike
        for k in probes:
            if k == "noop_stage_inline_s":
                f = noop(None)
            elif k == "noop_stage_submitit_local_poll2_s":
                f = noop({"executor": "local", "cpus_per_task": 2, "poll_s": 2.0})  # the default before 28c9068
            elif k == "noop_stage_submitit_local_poll0.1_s":
                f = noop({"executor": "local", "cpus_per_task": 2})  # today's local default: 0.1 s
            else:
                f = probes[k]
            runs[k].append(f())
    out = {k: round(median(v), 2) for k, v in runs.items()}
    out["runs"] = {k: [round(x, 2) for x in v] for k, v in runs.items()}
    if tiny_wd is not None:
        dry = []
        nothing = []
        for _ in range(reps):
            r, dt = snakemake(tiny_wd, "-n", timeout=600)
            dry.append(dt)
            r, dt = snakemake(tiny_wd, timeout=600)
            nothing.append(dt)
        out["snakemake_dryrun_s"] = round(median(dry), 2)
        out["snakemake_nothing_to_do_s"] = round(median(nothing), 2)
    out["submitit_local_cost_s"] = round(out["noop_stage_submitit_local_poll0.1_s"] - out["noop_stage_inline_s"], 2)
    out["poll_latency_saved_by_poll0.1_s"] = round(out["noop_stage_submitit_local_poll2_s"]
                                                    - out["noop_stage_submitit_local_poll0.1_s"], 2)
    return out


def main(argv=None):
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--with-pipeline", action="store_true", help="also run the default pipeline (~15 min)")
    ap.add_argument("--reps", type=int, help="repetitions of each no-op layer (default 1 quick / 3 full)")
    ap.add_argument("--read", metavar="WORKDIR", help="only the per-stage table of the finished run in WORKDIR "
                    "(its config.yaml and results): JSON to --json or stdout; measures nothing else")
    args = ap.parse_args(argv)
    if args.read:
        wd = Path(args.read)
        cfg = yaml.safe_load((wd / "config.yaml").read_text())
        with tempfile.TemporaryDirectory(prefix="stages-") as scratch:
            rows = stage_table(wd, cfg, Path(scratch))
        text = json.dumps(rows, indent=2)
        if args.json:
            Path(args.json).write_text(text)
        else:
            print(text)
        return
    reps = args.reps or (1 if args.quick else 3)
    load_before = load()
    scratch = cache_dir(args) / "pipeline"
    scratch.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    figures = []

    tiny = tiny_config()
    tiny_info, tiny_rows, _ = run_workflow(tiny, scratch, "tiny", timeout=1800)
    from benchmarks.common import fmnist_beton

    dec = decomposition(scratch, fmnist_beton(cache_dir(args), "train", 384), reps, Path(tiny_info["workdir"]))

    source_rows, source, source_wall = tiny_rows, "tiny config (384 train / 256 val images)", tiny_info["wall_s"]
    if args.with_pipeline:
        default_cfg = yaml.safe_load((REPO / "config.yaml").read_text())
        # the committed reference rows, as the repository's own run reads them (relative to the repository)
        default_cfg["reference"] = [str(REPO / r) for r in default_cfg.get("reference", [])]
        t_before = load()
        info, rows, wall = run_workflow(default_cfg, scratch, "default", timeout=3600)
        source_rows, source, source_wall = rows, "default pipeline (config.yaml)", wall
        per_rule = {}
        for r in rows:
            per_rule.setdefault(r["rule"], []).append(r["wall_s"])
        details = {
            "command": f"snakemake -s {REPO}/Snakefile --directory TMP --configfile TMP/config.yaml --cores 2",
            "config": "the repo's config.yaml (fmnist_r18: barlow_twins_r18 + random_init_r18)",
            "stages": rows, "wall_by_rule_s": per_rule, **info,
            "peer_note": "the default preset's stated budget (~15 min end to end, barlow/presets/fmnist_r18.yaml)",
            "load_avg_before": t_before, "load_avg_after": load(), "mode": mode,
        }
        figures.append(figure("default_pipeline_s", wall, "s", "stated budget: ~15 min", 900.0, 900.0 / wall, details))

    overheads = [r["overhead_s"] for r in source_rows if r["overhead_s"] is not None]
    worst = max(overheads)
    details = {
        "source": source, "stages": source_rows, "median_overhead_s": round(median(overheads), 2),
        "max_overhead_s": round(worst, 2),
        # the whole run's wall (perf_counter) minus the work every stage reports, shared out over the
        # stages (includes Snakemake's start, DAG and bookkeeping between jobs, outside each job's s)
        "mean_overhead_from_total_wall_s": round((source_wall - sum(r["own_work_s"] or 0 for r in source_rows))
                                                 / len(source_rows), 2),
        "direct_noop_decomposition": dec,
        "tiny_run": tiny_info, "tiny_stages": tiny_rows if source_rows is not tiny_rows else "= stages",
        "wall_from": "<results>/benchmarks/<rule>/<job>.tsv, column s (wall seconds, 0.01 s resolution)",
        "target_s": TARGET_S, "load_avg_before": load_before, "load_avg_after": load(), "mode": mode,
    }
    figures.append(figure("stage_overhead_s", worst, "s (max over stages)", f"target: <= {TARGET_S:g} s per stage",
                          TARGET_S, TARGET_S / worst if worst > 0 else None, details))
    emit(args, figures)
    if not args.with_pipeline:
        shutil.rmtree(Path(tiny_info["workdir"]) / "results" / "data", ignore_errors=True)


if __name__ == "__main__":
    main()
