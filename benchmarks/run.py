"""Run the performance benchmarks; write benchmarks/results.json and regenerate benchmarks/README.md.

    python -m benchmarks.run                   # honest sizes (~8 min on 2 cores), no full pipeline
    python -m benchmarks.run --quick           # every figure at small sizes (< 5 min)
    python -m benchmarks.run --with-pipeline   # + the default pipeline end to end (~12 min more)
    python -m benchmarks.run --only loader,step
    python -m benchmarks.run --readme-only     # rewrite README.md from results.json (+ findings.md)

Each figure module runs in its own subprocess. Figures not measured in this run (e.g.
``default_pipeline_s`` without ``--with-pipeline``) are kept from the previous results.json with
their own ``measured_at``/``commit``/``details.mode``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.common import DEFAULT_CACHE, REPO, commit, load, machine, now_iso

HERE = Path(__file__).resolve().parent
MODULES = ["loader", "step", "probe", "pipeline", "memory", "smoke"]
ORDER = ["loader_full_aug", "pretrain_step", "pretrain_step_bf16", "probe_single_pass", "default_pipeline_s", "stage_overhead_s", "peak_rss_mb", "smoke_cifar10_s"]
TARGETS = {"loader_full_aug": "ratio >= 5", "pretrain_step": "ratio >= 1.0", "pretrain_step_bf16": "ratio >= 1.0", "probe_single_pass": "ratio >= 0.95 x cap (details.cap)",
           "default_pipeline_s": "<= 900 s", "stage_overhead_s": "<= 3 s per stage", "peak_rss_mb": "fits in RAM", "smoke_cifar10_s": "<= 180 s"}
TIMEOUT = {"loader": 600, "step": 600, "probe": 600, "pipeline": 3600, "memory": 900, "smoke": 1800}


def run_module(mod: str, args) -> tuple[list[dict], str | None, float]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, "-m", f"benchmarks.{mod}", "--json", str(out), "--cache-dir", args.cache_dir]
    if args.quick:
        cmd.append("--quick")
    if mod == "pipeline" and args.with_pipeline:
        cmd.append("--with-pipeline")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    print(f"== benchmarks.{mod}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, timeout=TIMEOUT[mod] * (2 if args.with_pipeline else 1))
        err = None if r.returncode == 0 else f"exit status {r.returncode}"
    except subprocess.TimeoutExpired:
        err = "timed out"
    dt = time.perf_counter() - t0
    figs = json.loads(out.read_text()) if err is None and out.stat().st_size else []
    out.unlink(missing_ok=True)
    print(f"== benchmarks.{mod}: {'done' if err is None else err} in {dt:.0f} s", file=sys.stderr, flush=True)
    return figs, err, dt


def fmt(x, unit: str = "") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        s = f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"
    else:
        s = str(x)
    return f"{s} {unit}".strip()


def readme(figs: list[dict], meta: dict) -> str:
    rows = []
    for f in figs:
        d = f.get("details", {})
        rows.append(f"| `{f['name']}` | {fmt(f['value'], f['unit'])} | {f.get('peer') or '—'} | "
                    f"{fmt(f.get('peer_value'))} | {fmt(f.get('ratio'))} | {TARGETS.get(f['name'], '')} | "
                    f"{d.get('mode', '')} | {f['measured_at']} | `{f['commit']}` | "
                    f"{' / '.join(str(x) for x in d.get('load_avg_before', []))} |")
    table = "\n".join(rows)
    sections = []
    for f in figs:
        d = f.get("details", {})
        keep = {k: v for k, v in d.items() if k not in ("stages", "tiny_stages", "runs") and not isinstance(v, list)
                or k in ("ours_samples_per_s", "peer_samples_per_s", "ours_steps_per_s", "peer_steps_per_s",
                         "ours_wall_s", "peer_wall_s")}
        body = json.dumps(keep, indent=1)
        stages = d.get("stages")
        stage_md = ""
        if isinstance(stages, list):
            stage_md = "\n| rule | job | wall s | own work s (from) | overhead s |\n|---|---|---|---|---|\n" + "\n".join(
                f"| {s['rule']} | {s.get('job') or ', '.join(f'{k}={v}' for k, v in s['wildcards'].items())} | {s['wall_s']} | "
                f"{s['own_work_s']} ({s['own_work_from']}) | {s['overhead_s']} |" for s in stages) + "\n"
        sections.append(f"### `{f['name']}`\n\nMachine: {f['machine']}\n{stage_md}\n<details><summary>details</summary>"
                        f"\n\n```json\n{body}\n```\n</details>\n")
    doc = {m: (sys.modules.get(f"benchmarks.{m}") or __import__(f"benchmarks.{m}", fromlist=["x"])).__doc__ for m in MODULES}
    findings = HERE / "findings.md"
    findings_md = findings.read_text().strip() + "\n" if findings.is_file() else ""
    methods = "\n".join(f"#### benchmarks/{m}.py\n\n{textwrap.dedent(doc[m]).strip()}\n" for m in MODULES)
    return f"""# Performance benchmarks

Generated by `python -m benchmarks.run` ({meta['generated_at']}, commit `{meta['commit']}`); each figure
was measured at the commit and time in its own row.
Do not edit by hand: the next run rewrites this file from `benchmarks/results.json`.

Machine of this run: {meta['machine']}. Load average (1/5/15 min) at the start: {meta['load_avg']}.

## Commands

```sh
make bench                                            # = python -m benchmarks.run (installs first), ~8 min
make bench-all                                        # = python -m benchmarks.run --with-pipeline, ~20 min
.venv/bin/python -m benchmarks.run --quick            # every figure at small sizes, < 5 min
.venv/bin/python -m benchmarks.run --only loader,step # some figures; the others are kept from results.json
.venv/bin/python -m benchmarks.loader --quick         # one figure, JSON on stdout
```
From the repository root, on an otherwise idle machine (2 cores: any other process shows up in
every number; each figure records the load average before and after it). A figure whose commit
ends in `-dirty` was measured with uncommitted changes to tracked files.
`default_pipeline_s`, `stage_overhead_s` and `peak_rss_mb` are compared with their targets or the
machine's RAM, not with a peer program.
Datasets (.beton) and scratch workflows go to `{DEFAULT_CACHE}` (`--cache-dir`; env `BARLOW_BENCH_CACHE`).
This run: `{meta['argv']}`.
One-off studies (crop fidelity; the profiling experiments, dropped), outside this suite: `benchmarks/studies/README.md`.

## Figures

ratio = ours / peer, oriented so that higher is better (for times and memory: peer / ours).

| figure | ours | peer | peer value | ratio | target | mode | measured at (UTC) | commit | load avg |
|---|---|---|---|---|---|---|---|---|---|
{table}

{findings_md}
## How each figure is measured

{methods}
## Details per figure

{chr(10).join(sections)}
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--with-pipeline", action="store_true")
    ap.add_argument("--only", help=f"comma-separated modules among {','.join(MODULES)}")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--readme-only", action="store_true", help="only regenerate README.md from results.json")
    args = ap.parse_args(argv)
    mods = args.only.split(",") if args.only else MODULES
    unknown = set(mods) - set(MODULES)
    if unknown:
        ap.error(f"unknown module(s) {sorted(unknown)}; choose from {MODULES}")
    meta = {"generated_at": now_iso(), "commit": commit(), "machine": machine(), "load_avg": load(),
            "argv": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    old = {f["name"]: f for f in json.loads(out.read_text())} if out.is_file() else {}
    if args.readme_only:
        figs = [old[n] for n in ORDER if n in old] + [f for n, f in old.items() if n not in ORDER]
        meta["argv"] = "(README regenerated from results.json)"
        meta["load_avg"] = "see each figure"
        (HERE / "README.md").write_text(readme(figs, meta))
        return 0
    new, errors, t0 = {}, {}, time.perf_counter()
    for mod in mods:
        figs, err, dt = run_module(mod, args)
        if err:
            errors[mod] = err
        for f in figs:
            f.setdefault("details", {})["module_wall_s"] = round(dt, 1)
            new[f["name"]] = f
    merged = {**old, **new}
    figs = [merged[n] for n in ORDER if n in merged] + [f for n, f in merged.items() if n not in ORDER]
    out.write_text(json.dumps(figs, indent=2) + "\n")
    (HERE / "README.md").write_text(readme(figs, meta))
    print(f"wrote {out} and {HERE / 'README.md'} in {time.perf_counter() - t0:.0f} s"
          + (f"; FAILED: {errors}" if errors else ""), file=sys.stderr)
    for f in figs:
        print(f"{f['name']:20s} {fmt(f['value'], f['unit']):>24s}  peer {fmt(f.get('peer_value')):>10s}  "
              f"ratio {fmt(f.get('ratio')):>6s}  ({f['details'].get('mode', '?')}, {f['measured_at']})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
