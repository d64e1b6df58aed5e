"""Figures ``stage_overhead_s`` and (with ``--with-pipeline``) ``default_pipeline_s``.

Per-stage wall time comes from Snakemake's own log: the ``[timestamp]`` line before each
``(local)rule NAME:`` block (start) and before ``Finished jobid: N`` (end); one-second resolution.
The work a stage itself reports is subtracted:

* pretrain: ``wall_s`` stored in backbone.pth (barlow.pretrain: from after the model is built to the
  save; 0 for a random-init backbone, whose job is therefore a pure no-op through the launch path);
* probe_pass: ``probe_wall_s`` in probes/<pass>.json (barlow.probe.run_probes from start to the JSON);
* probe: merging the passes, re-timed in-process;
* convert and report print no timing: their work is timed here by calling ``barlow.data.convert`` /
  ``barlow.report.report`` in this process with the same arguments (imports already warm).

overhead = stage wall - own work = interpreter start + imports + CLI + submitit local executor
(pickle, child process, the launcher's polling) + Snakemake's bookkeeping between jobs.

The overhead is also measured directly, with a no-op stage (a random-init pretrain, which only
builds and saves a ResNet-18) through each layer of the launch path: ``python -c pass``, ``import
torch``, ``python -m barlow presets``, ``python -m barlow pretrain --executor inline``, the same through
submitit's local executor (``launcher.poll_s`` 2.0, the default before commit 28c9068, and 0.1, the local default since), plus ``snakemake -n`` on
the workflow (parse, validate, DAG) and a re-run with nothing to do.

Default run and ``--quick``: a tiny config (384 train / 256 val images, as tests/test_workflow.py).
``--with-pipeline``: additionally the default pipeline end to end (the repo's config.yaml in a fresh
temporary workdir, ``snakemake --cores 2``; ~15 min), whose per-stage overheads then give the figure.
"""
from __future__ import annotations

import copy
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from benchmarks.common import REPO, base_parser, cache_dir, emit, figure, load, log, median

PY = sys.executable
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
STAGES = ("convert", "pretrain", "probe_pass", "probe", "report")


def tiny_config(results: str = "results") -> dict:
    """The workflow tests' tiny config (384 train / 256 val; 6 pretraining steps; cached probes)."""
    from tests.test_workflow import tiny_config as tests_tiny

    return tests_tiny(results)


def snakemake(workdir: Path, *extra: str, timeout: int = 3600) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
           str(workdir / "config.yaml"), "--cores", "2", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r, time.perf_counter() - t0


_TS = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")


def parse_jobs(log_text: str) -> list[dict]:
    """Jobs with rule, wildcards, start/end (epoch seconds) from Snakemake's log."""
    jobs: dict[str, dict] = {}
    ts, cur = None, None
    for line in log_text.splitlines():
        s = line.strip()
        m = _TS.match(s)
        if m:
            ts = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y").timestamp()
            cur = None
            continue
        m = re.match(r"^(?:local)?rule (\w+):$", s)
        if m:
            cur = {"rule": m.group(1), "start": ts, "wildcards": {}}
            continue
        if cur is not None:
            m = re.match(r"^jobid: (\d+)$", s)
            if m:
                jobs[m.group(1)] = cur
                continue
            m = re.match(r"^wildcards: (.*)$", s)
            if m:
                cur["wildcards"] = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
                continue
        m = re.match(r"^Finished jobid: (\d+)", s)
        if m and m.group(1) in jobs:
            jobs[m.group(1)]["end"] = ts
    out = []
    for jid, j in sorted(jobs.items(), key=lambda kv: (kv[1]["start"] or 0, int(kv[0]))):
        if j["rule"] == "all" or "end" not in j:
            continue
        out.append({"jobid": int(jid), **j, "wall_s": j["end"] - j["start"]})
    return out


def own_work(job: dict, workdir: Path, results: str, cfg: dict, scratch: Path) -> tuple[float | None, str]:
    """Seconds of work the stage itself did (see the module docstring), and where the number came from."""
    import torch

    w, rule = job["wildcards"], job["rule"]
    res = workdir / results
    if rule == "pretrain":
        run = res / w["dataset"] / w["exp"]
        blob = torch.load(run / "backbone.pth", map_location="cpu", weights_only=False)
        # an untrained backbone's only work is the online monitor's step-0 evaluation (its metrics.csv row):
        # the random-init baseline, real work, not launch overhead; a trained run's wall_s includes its own
        monitor = 0.0
        if (run / "metrics.csv").is_file():
            with open(run / "metrics.csv", newline="") as f:
                monitor = sum(float(r["monitor_s"] or 0.0) for r in csv.DictReader(f) if r["step"] == "0")
        return float(blob.get("wall_s") or 0.0) + monitor, "backbone.pth wall_s + the step-0 monitor row's monitor_s"
    if rule == "probe_pass":
        path = res / w["dataset"] / w["exp"] / "probes" / f"{w['pass_']}.json"
        return float(json.loads(path.read_text())["probe_wall_s"]), "probes/<pass>.json probe_wall_s"
    if rule == "probe":  # merging the passes' JSON
        from barlow.probe import merge_passes

        parts = sorted(str(p) for p in (res / w["dataset"] / w["exp"] / "probes").glob("*.json"))
        t0 = time.perf_counter()
        merge_passes(parts, scratch / "probes.json")
        return time.perf_counter() - t0, "barlow.probe.merge_passes re-timed in-process"
    if rule == "convert":
        from barlow.config import validate
        from barlow.data import IMAGE_SIZE, convert

        full = validate(copy.deepcopy(cfg), REPO / "workflow" / "schemas" / "config.schema.yaml", "config", fill=True)
        ds = full["datasets"][w["dataset"]]  # with the config schema's defaults, as Snakemake fills them
        t0 = time.perf_counter()
        convert(ds["kind"], ds["path"], w["split"], scratch / f"{w['dataset']}_{w['split']}.beton",
                image_size=ds.get("image_size") or IMAGE_SIZE, limit=ds.get(f"limit_{w['split']}"),
                workers=ds["workers"])
        return time.perf_counter() - t0, "barlow.data.convert re-timed in-process"
    if rule == "report":
        from barlow.report import report

        runs = sorted(str(p) for pattern in ("*/*/probes.json", "*/*/seed*/probes.json") for p in res.glob(pattern))
        t0 = time.perf_counter()
        report(runs, scratch / "report", provenance={"config_file": "config.yaml"})
        return time.perf_counter() - t0, "barlow.report.report re-timed in-process"
    return None, "unknown"


def stage_table(log_text: str, workdir: Path, results: str, cfg: dict, scratch: Path) -> list[dict]:
    rows = []
    for j in parse_jobs(log_text):
        own, src = own_work(j, workdir, results, cfg, scratch)
        rows.append({"rule": j["rule"], "wildcards": j["wildcards"], "wall_s": round(j["wall_s"], 1),
                     "own_work_s": None if own is None else round(own, 2), "own_work_from": src,
                     "overhead_s": None if own is None else round(j["wall_s"] - own, 2)})
    return rows


def run_workflow(cfg: dict, scratch: Path, tag: str, timeout: int) -> tuple[dict, list[dict], float]:
    wd = Path(tempfile.mkdtemp(prefix=f"wf-{tag}-", dir=scratch))
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    log(f"snakemake --cores 2 in {wd} ({tag}) ...")
    r, wall = snakemake(wd, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"snakemake failed ({tag}):\n{r.stderr[-3000:]}")
    log(f"  finished in {wall:.1f} s")
    rows = stage_table(r.stderr, wd, cfg.get("results", "results"), cfg, wd / "_scratch")
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
    args = ap.parse_args(argv)
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
        # not limited by the log's 1 s timestamps: the whole run's wall (perf_counter) minus the
        # work every stage reports, shared out over the stages (includes Snakemake's start and DAG)
        "mean_overhead_from_total_wall_s": round((source_wall - sum(r["own_work_s"] or 0 for r in source_rows))
                                                 / len(source_rows), 2),
        "direct_noop_decomposition": dec,
        "tiny_run": tiny_info, "tiny_stages": tiny_rows if source_rows is not tiny_rows else "= stages",
        "timestamps": "Snakemake log timestamps have 1 s resolution: each wall (so each overhead) is +-1 s",
        "target_s": 5.0, "load_avg_before": load_before, "load_avg_after": load(), "mode": mode,
    }
    figures.append(figure("stage_overhead_s", worst, "s (max over stages)", "target: <= 5 s per stage", 5.0,
                          5.0 / worst if worst > 0 else None, details))
    emit(args, figures)
    if not args.with_pipeline:
        shutil.rmtree(Path(tiny_info["workdir"]) / "results" / "data", ignore_errors=True)


if __name__ == "__main__":
    main()
