# report: every experiment's probes.json -> benchmark table (Markdown + CSV + HTML) and plots.
# Each output is marked for `snakemake --report results/report.html` (captions: workflow/report/).


localrules:
    report,


rule report:
    input:
        runs=all_probes(),
        finetune=all_finetunes(),  # (none unless an experiment has finetune: true)
        # not in smoke mode: a smoke run is compared with nothing
        reference=[] if SMOKE else config.get("reference", []),
    output:
        md=report(f"{RESULTS}/benchmark.md", caption="../report/benchmark_md.rst", category="Benchmark",
                  labels={"file": "benchmark.md", "content": "the table, published format"}),
        csv=report(f"{RESULTS}/benchmark.csv", caption="../report/benchmark_csv.rst", category="Benchmark",
                   labels={"file": "benchmark.csv", "content": "the table with provenance"}),
        html=report(f"{RESULTS}/benchmark.html", caption="../report/benchmark_html.rst", category="Benchmark",
                    labels={"file": "benchmark.html", "content": "the table with provenance (view)"}),
        top1=report(f"{RESULTS}/plots/top1_by_feature.png", caption="../report/top1_by_feature.rst", category="Plots",
                    labels={"plot": "top-1 by feature level"}),
        curves=report(f"{RESULTS}/plots/pretrain_curves.png", caption="../report/pretrain_curves.rst",
                      category="Plots", labels={"plot": "pretraining loss and learning rate"}),
        monitor=report(f"{RESULTS}/plots/monitor_curves.png", caption="../report/monitor_curves.rst",
                       category="Plots", labels={"plot": "online kNN and linear monitors"}),
    params:
        out_dir=lambda w, output: os.path.dirname(output.md),
        runs=quoted_json(report_runs()),  # identity by the workflow, never parsed from a path
        prov=lambda w: quoted_json({"config_file": os.path.relpath(workflow.configfiles[0]) if workflow.configfiles else "config.yaml"}),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    conda:
        "../../envs/barlow.yaml"
    shell:
        "python -m barlow report --runs-json {params.runs} --reference {input.reference} --out-dir {params.out_dir} --provenance-json {params.prov} > {log} 2>&1 || {{ grep -h '^error:' {log} >&2; exit 1; }}"
