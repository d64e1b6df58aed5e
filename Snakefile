# Barlow Twins benchmark: convert -> pretrain -> probe -> report.
#   laptop:  snakemake --cores 2
#   cluster: snakemake --profile slurm
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{RESULTS}/benchmark.md",
        f"{RESULTS}/benchmark.csv",
        f"{RESULTS}/plots/top1_by_feature.png",
        f"{RESULTS}/plots/pretrain_curves.png",
