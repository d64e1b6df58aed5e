# probe: one job per evaluation pass, then the passes of an experiment merged into probes.json
# (one row of the table). The published protocol's two passes (five-feature, 90 epochs; AvgPool,
# 100 epochs) are independent: two jobs (two SLURM jobs on a cluster) that run side by side and
# resume on their own; a single-pass or cached protocol is one pass, so one job.


localrules:
    probe,
    merge_probes,


rule probe:
    input:
        backbone=backbone_input,  # backbone.pth, or the released checkpoint (pretrain.init: checkpoint)
        train=lambda w: beton(w.dataset, "train"),
        val=lambda w: beton(w.dataset, "val"),
    output:
        f"{RESULTS}/{{dataset}}/{{exp}}/probes/{{pass_}}.json",
    params:
        # only this pass's learning settings: editing the other pass (or a runtime knob) reruns nothing here
        cfg=lambda w: quoted_json(pass_config(RUNS[w.exp].cfg, w.pass_)),
    threads: local_threads("probe")
    resources:
        launcher=lambda w: launcher("probe"),
        knobs=probe_knobs,  # runtime knobs (barlow.identity) and identity: a resource, so editing them reruns nothing
    log:
        f"{RESULTS}/logs/probe/{{dataset}}_{{exp}}_{{pass_}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe/{{dataset}}_{{exp}}_{{pass_}}.tsv"
    conda:
        "../../envs/barlow.yaml"
    shell:
        "python -m barlow probe --config-json {params.cfg} --runtime-json {resources.knobs:q}"
        " --launcher-json {resources.launcher:q} --backbone {input.backbone} --train {input.train}"
        " --val {input.val} --out {output} 2>&1 | tee {log}"


rule merge_probes:
    input:
        pass_outputs,
    output:
        report(
            f"{RESULTS}/{{dataset}}/{{exp}}/probes.json",
            caption="../report/probes.rst",
            category="{dataset}",
            subcategory=lambda w: RUNS[w.exp].experiment,
            # a string: the report's page sorts labels with localeCompare, which a number lacks (blank page)
            labels=lambda w: {"file": "probes.json"} if RUNS[w.exp].seed is None else {"seed": str(RUNS[w.exp].seed), "file": "probes.json"},
        ),
    log:
        f"{RESULTS}/logs/probe/{{dataset}}_{{exp}}_merge.log",
    benchmark:
        f"{RESULTS}/benchmarks/merge_probes/{{dataset}}_{{exp}}.tsv"
    conda:
        "../../envs/barlow.yaml"
    shell:
        "python -m barlow merge-probes --parts {input} --out {output} > {log} 2>&1 || {{ grep -h '^error:' {log} >&2; exit 1; }}"
