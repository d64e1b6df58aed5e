# probe: six linear heads (Feature1-5 + AvgPool) on the frozen backbone, top-1 on val -> JSON.


localrules:
    probe,


rule probe:
    input:
        backbone=f"{RESULTS}/{{dataset}}/{{exp}}/backbone.pth",
        train=lambda w: beton(w.dataset, "train"),
        val=lambda w: beton(w.dataset, "val"),
    output:
        f"{RESULTS}/{{dataset}}/{{exp}}/probes.json",
    params:
        cfg=probe_config,
    threads: local_threads("probe")
    resources:
        launcher=lambda w: launcher("probe"),
    log:
        f"{RESULTS}/logs/probe/{{dataset}}_{{exp}}.log",
    conda:
        "../../envs/barlow.yaml"
    shell:
        "{PY} -m barlow probe --config-json {params.cfg} --launcher-json {resources.launcher:q}"
        " --backbone {input.backbone} --train {input.train} --val {input.val} --out {output} 2>&1 | tee {log}"
