# report: every experiment's probes.json -> benchmark table (Markdown + CSV) and plots.


localrules:
    report,


rule report:
    input:
        all_probes(),
    output:
        md=f"{RESULTS}/benchmark.md",
        csv=f"{RESULTS}/benchmark.csv",
        top1=f"{RESULTS}/plots/top1_by_feature.png",
        curves=f"{RESULTS}/plots/pretrain_curves.png",
    params:
        out_dir=lambda w, output: os.path.dirname(output.md),
        prov=lambda w: quoted_json({"config_file": os.path.relpath(workflow.configfiles[0]) if workflow.configfiles else "config.yaml"}),
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../../envs/barlow.yaml"
    shell:
        "python -m barlow report --runs {input} --out-dir {params.out_dir} --provenance-json {params.prov} > {log} 2>&1 || {{ grep -h '^error:' {log} >&2; exit 1; }}"
