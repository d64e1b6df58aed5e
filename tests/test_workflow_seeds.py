"""`seeds: [0, 1]` in config.yaml: one pretraining and one probe per seed, each in <dataset>/<exp>/seed<k>/,
and an experiment without seeds scheduled exactly as before. Dry runs only (no training)."""
from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from barlow import config as barlow_config
from barlow.identity import pass_config, weights_config
from tests.test_workflow import snakemake, tiny_config, weights_dir


def dry_run(tmp_path, cfg: dict, *args: str) -> list[dict]:
    """The jobs `snakemake -n -p` schedules: rule, output, log, benchmark, wildcards, shell command."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", "-p", *args, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    jobs = []
    for line in (r.stdout + r.stderr).splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            jobs.append({"rule": m.group(1)})
            continue
        m = re.match(r"^    (input|output|log|benchmark|wildcards): (.*)$", line)
        if m and jobs:
            jobs[-1][m.group(1)] = m.group(2)
        elif line.startswith("Shell command: ") and jobs:
            jobs[-1]["shell"] = line[len("Shell command: "):]
    return jobs


def config_json(shell: str) -> dict:
    words = shlex.split(shell)
    return json.loads(words[words.index("--config-json") + 1])


def by_rule(jobs: list[dict], rule: str) -> dict[str, dict]:
    return {j["output"]: j for j in jobs if j["rule"] == rule}


def seeded_config() -> dict:
    cfg = tiny_config()
    cfg["experiments"]["bt"]["seeds"] = [0, 1]
    cfg["experiments"]["bt"]["overrides"]["probe"]["seed"] = 7  # the seed list wins over an override
    return cfg


@pytest.mark.parametrize("smoke", [False, True])
def test_each_seed_is_its_own_pretraining_and_probe(tmp_path, smoke):
    jobs = dry_run(tmp_path, seeded_config(), *(["--config", "smoke=true"] if smoke else []))
    res = "results/smoke" if smoke else "results"
    w = {k: str(weights_dir(tmp_path, k, smoke).relative_to(tmp_path)) for k in ("bt/seed0", "bt/seed1", "random")}
    assert len(set(w.values())) == 3 and all(d.startswith(f"{res}/tiny/weights/") for d in w.values())
    pretrain = by_rule(jobs, "pretrain")
    assert sorted(pretrain) == sorted(f"{d}/backbone.pth" for d in w.values())
    probe_pass = by_rule(jobs, "probe")
    assert sorted(probe_pass) == [f"{res}/tiny/bt/seed0/probes/all_heads.json",
                                  f"{res}/tiny/bt/seed1/probes/all_heads.json",
                                  f"{res}/tiny/random/probes/all_heads.json"]
    probe = by_rule(jobs, "merge_probes")
    assert sorted(probe) == [f"{res}/tiny/bt/seed0/probes.json", f"{res}/tiny/bt/seed1/probes.json",
                             f"{res}/tiny/random/probes.json"]
    seen = []
    for k in (0, 1):
        pre = pretrain[f"{w[f'bt/seed{k}']}/backbone.pth"]
        rel = w[f"bt/seed{k}"][len(res) + 1:]
        assert pre["wildcards"] == f"weights={rel}"
        assert pre["log"] == f"{res}/logs/pretrain/{rel}.log"
        assert pre["benchmark"] == f"{res}/benchmarks/pretrain/{rel}.tsv"
        assert config_json(pre["shell"])["pretrain"]["seed"] == k
        assert f"--out {w[f'bt/seed{k}']}/backbone.pth" in pre["shell"]
        pp = probe_pass[f"{res}/tiny/bt/seed{k}/probes/all_heads.json"]
        assert pp["input"].startswith(f"{w[f'bt/seed{k}']}/backbone.pth, ")  # its own seed's weights
        assert pp["log"] == f"{res}/logs/probe/tiny_bt/seed{k}_all_heads.log"
        probe_cfg = config_json(pp["shell"])
        assert probe_cfg["pretrain"]["seed"] == k and probe_cfg["probe"]["seed"] == k
        assert probe[f"{res}/tiny/bt/seed{k}/probes.json"]["input"] == f"{res}/tiny/bt/seed{k}/probes/all_heads.json"
        seen.append(config_json(pre["shell"]))
    # the seeds differ in the seed and nothing else
    for cfg in seen:
        cfg["pretrain"].pop("seed")
    assert seen[0] == seen[1]
    # an experiment without seeds beside them is untouched: its preset's seed
    assert config_json(pretrain[f"{w['random']}/backbone.pth"]["shell"])["pretrain"]["seed"] == 0
    (report,) = [j for j in jobs if j["rule"] == "report"]
    assert report["input"].split(", ") == [f"{res}/tiny/bt/seed0/probes.json", f"{res}/tiny/bt/seed1/probes.json",
                                           f"{res}/tiny/random/probes.json"]


def test_without_seeds_the_stages_get_the_configs_of_before(tmp_path):
    """The same --config-json as before seeds (and weights folders) existed: what Snakemake hashes, so a
    finished run is not rerun (tests/test_workflow_layout.py runs one)."""
    cfg = tiny_config()
    jobs = dry_run(tmp_path, cfg)
    assert sorted(j["rule"] for j in jobs) == sorted(["convert", "convert", "pretrain", "pretrain", "probe",
                                                      "probe", "merge_probes", "merge_probes", "report", "all"])
    for name in ("bt", "random"):
        exp = cfg["experiments"][name]
        resolved = barlow_config.apply_dataset(barlow_config.resolve(exp["preset"], exp["overrides"], fill=False),
                                               cfg["datasets"]["tiny"], name)
        wdir = weights_dir(tmp_path, name).relative_to(tmp_path)
        pre = by_rule(jobs, "pretrain")[f"{wdir}/backbone.pth"]
        assert config_json(pre["shell"]) == json.loads(json.dumps(weights_config(resolved)))
        pp = by_rule(jobs, "probe")[f"results/tiny/{name}/probes/all_heads.json"]
        assert pp["log"] == f"results/logs/probe/tiny_{name}_all_heads.log"
        assert config_json(pp["shell"]) == json.loads(json.dumps(pass_config(resolved, "all_heads")))
        assert by_rule(jobs, "merge_probes")[f"results/tiny/{name}/probes.json"]["log"] == \
            f"results/logs/probe/tiny_{name}_merge.log"
    (report,) = [j for j in jobs if j["rule"] == "report"]
    assert report["input"] == "results/tiny/bt/probes.json, results/tiny/random/probes.json"


@pytest.mark.parametrize("seeds, pattern", [
    ([], r"^error: config\.experiments\.bt\.seeds: \[\] should be non-empty"),
    ([0, 0], r"^error: config\.experiments\.bt\.seeds: \[0, 0\] has non-unique elements"),
    ([-1], r"^error: config\.experiments\.bt\.seeds\.0: -1 is less than the minimum of 0"),
    (["a"], r"^error: config\.experiments\.bt\.seeds\.0: 'a' is not of type 'integer'"),
])
def test_bad_seeds_one_line(tmp_path, seeds, pattern):
    cfg = tiny_config()
    cfg["experiments"]["bt"]["seeds"] = seeds
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and re.search(pattern, errors[0]), r.stderr[-1500:]


def test_an_experiment_name_with_a_slash_is_refused(tmp_path):
    cfg = tiny_config()
    cfg["experiments"]["bt/seed0"] = cfg["experiments"].pop("random")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(tmp_path, "-n", timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "'bt/seed0' is not a folder name" in errors[0], r.stderr[-1500:]


def test_an_unquoted_yaml_boolean_name_says_to_quote_it(tmp_path):
    cfg = tiny_config()
    del cfg["experiments"]["random"]
    text = yaml.safe_dump(cfg).replace("\n  bt:\n", "\n  off:\n")  # as a user types it: YAML reads False
    assert "\n  off:\n" in text
    (tmp_path / "config.yaml").write_text(text)
    r = snakemake(tmp_path, "-n", timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert errors[0].startswith("error: config.experiments: the name False is a YAML bool") and "quote it" in errors[0]
