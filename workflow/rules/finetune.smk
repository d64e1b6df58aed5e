# finetune: the semi-supervised evaluation (barlow/finetune.py), one job per (run, percent of the train labels)
# of an experiment with `finetune: true` (config.yaml; none by default). Launched as the probes are: a local rule
# whose submitit job runs here or on SLURM, data-parallel over launcher.finetune's tasks, resumable from the
# checkpoint it keeps beside its result (deliberately undeclared: a failed job's cleanup must not delete it).


localrules:
    finetune,


rule finetune:
    input:
        backbone=backbone_input,  # the probes' weights: backbone.pth, or the released checkpoint
        train=lambda w: beton(w.dataset, "train"),
        # names the train split's file list (class folders), through which SimCLR's ImageNet subsets are found
        train_summary=lambda w: layout.beton_summary(RESULTS, w.dataset, "train"),
        val=lambda w: beton(w.dataset, "val"),
    output:
        json=layout.finetune_file(RESULTS, "{dataset}", "{exp}", "{percent}"),
        subset=layout.finetune_subset(layout.finetune_file(RESULTS, "{dataset}", "{exp}", "{percent}")),
    params:
        cfg=finetune_params,  # the weights' config + the finetune learning settings: a probe edit reruns nothing here
    threads: local_threads("finetune")
    resources:
        launcher=lambda w: launcher("finetune"),
        knobs=finetune_knobs,  # runtime knobs and identity: a resource, so editing them reruns nothing
    log:
        layout.finetune_log(RESULTS, "{dataset}", "{exp}", "{percent}"),
    benchmark:
        layout.finetune_benchmark(RESULTS, "{dataset}", "{exp}", "{percent}")
    conda:
        "../../envs/barlow.yaml"
    shell:
        "python -m barlow finetune --config-json {params.cfg} --runtime-json {resources.knobs:q}"
        " --launcher-json {resources.launcher:q} --backbone {input.backbone} --train {input.train}"
        " --val {input.val} --percent {wildcards.percent} --out {output.json} 2>&1 | tee {log}"
