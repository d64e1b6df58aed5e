# convert: dataset -> FFCV .beton (written under a temporary name, renamed when complete).

for _name, _ds in DATASETS.items():
    if _ds.get("subset") and _ds.get("classes_file"):
        sys.exit(f"error: config.datasets.{_name}: subset {_ds['subset']!r} and classes_file {_ds['classes_file']!r} "
                 "both name a class list; keep one")


rule convert:
    input:
        unpack(convert_inputs),
        # a user's class list is an input: editing it reconverts (a shipped subset's list travels with the code)
        class_list=lambda w: DATASETS[w.dataset].get("classes_file") or [],
    output:
        beton=f"{RESULTS}/data/{{dataset}}/{{split}}.beton",
        summary=f"{RESULTS}/data/{{dataset}}/{{split}}.json",
    params:
        kind=lambda w: DATASETS[w.dataset]["kind"],
        path=lambda w: shlex.quote(DATASETS[w.dataset]["path"]),
        size=lambda w: DATASETS[w.dataset].get("image_size") or CONVERT_IMAGE_SIZE,
        limit=lambda w: (lambda n: f"--limit {n}" if n else "")(DATASETS[w.dataset].get(f"limit_{w.split}")),
        write=lambda w: " ".join(
            [f"--write-mode {DATASETS[w.dataset]['write_mode']}",  # (defaults: the config schema's)
             f"--jpeg-quality {DATASETS[w.dataset]['jpeg_quality']}",
             f"--compress-probability {DATASETS[w.dataset]['compress_probability']}"]
            + ([f"--max-resolution {DATASETS[w.dataset]['max_resolution']}"] if DATASETS[w.dataset].get("max_resolution") else [])
        ),
        classes=lambda w, input: f"--classes-from {input.classes}" if "classes" in input.keys() else "",
        # image_folder restricted to a class list: a shipped one (subset: imagenet100) or the user's file
        subset=lambda w: " ".join(
            ([f"--subset {DATASETS[w.dataset]['subset']}"] if DATASETS[w.dataset].get("subset") else [])
            + ([f"--classes-file {shlex.quote(DATASETS[w.dataset]['classes_file'])}"]
               if DATASETS[w.dataset].get("classes_file") else [])
        ),
    threads: lambda w: DATASETS[w.dataset]["workers"]
    resources:
        mem_mb=8000,
        runtime=240,
    log:
        f"{RESULTS}/logs/convert/{{dataset}}_{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/convert/{{dataset}}_{{split}}.tsv"
    conda:
        "../../envs/barlow.yaml"
    shell:
        "python -m barlow convert --kind {params.kind} --path {params.path} --split {wildcards.split}"
        " --out {output.beton} --image-size {params.size} {params.limit} {params.write} {params.classes} {params.subset}"
        " --workers {threads} > {log} 2>&1 || {{ grep -h '^error:' {log} >&2; exit 1; }}"  # the one-line error on the console
