# pretrain: Barlow Twins via submitit (local child process, or a SLURM job this rule waits on).
# A local rule even under --profile slurm: submitit does the submitting (multi-node, requeue on
# timeout/preemption, re-attach after a restart); it must never run inside a SLURM job itself.


localrules:
    pretrain,


rule pretrain:
    input:
        train=lambda w: beton(weights_run(w).dataset, "train"),
    output:
        # One folder per weights config (barlow.layout): experiments that differ only in the probe
        # share it. Protected: a finished multi-day run is never overwritten by accident. The resume
        # checkpoint (checkpoint.pt) and metrics.csv beside it are deliberately undeclared, so a
        # failed job's cleanup cannot delete them.
        weights=protected(f"{RESULTS}/{{weights}}/backbone.pth"),
    params:
        cfg=pretrain_config,
    threads: local_threads("pretrain")
    resources:
        launcher=lambda w: launcher("pretrain"),
        knobs=pretrain_knobs,  # not `runtime`: Snakemake reads that one as a time limit
    log:
        f"{RESULTS}/logs/pretrain/{{weights}}.log",  # = layout.pretrain_log
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{weights}}.tsv"
    conda:
        "../../envs/barlow.yaml"
    shell:
        "python -m barlow pretrain --config-json {params.cfg} --runtime-json {resources.knobs:q}"
        " --launcher-json {resources.launcher:q}"
        " --train {input.train} --out {output.weights} 2>&1 | tee {log}"
