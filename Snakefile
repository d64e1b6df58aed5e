# Barlow Twins benchmark: convert -> pretrain -> probe (and, where an experiment opts in, finetune) -> report.
#   laptop:  snakemake --cores 2
#   cluster: snakemake --profile slurm
#   report:  snakemake --report results/report.html   (after a run)
from snakemake.utils import min_version

min_version("9.0")


# A --configfile given on the command line replaces config.yaml instead of being merged into it,
# so a named configuration (e.g. workflow/configs/fmnist_long.yaml) runs only its own experiments.
if not workflow.config_settings.configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{RESULTS}/benchmark.md",
        f"{RESULTS}/benchmark.csv",
        f"{RESULTS}/benchmark.html",
        f"{RESULTS}/plots/top1_by_feature.png",
        f"{RESULTS}/plots/pretrain_curves.png",
        f"{RESULTS}/plots/monitor_curves.png",
        all_finetunes(),  # (the report reads them too; none unless an experiment has finetune: true)
