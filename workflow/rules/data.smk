# convert: dataset -> FFCV .beton (written under a temporary name, renamed when complete).


rule convert:
    input:
        unpack(convert_inputs),
    output:
        beton=f"{RESULTS}/data/{{dataset}}/{{split}}.beton",
        summary=f"{RESULTS}/data/{{dataset}}/{{split}}.json",
    params:
        kind=lambda w: DATASETS[w.dataset]["kind"],
        path=lambda w: shlex.quote(DATASETS[w.dataset]["path"]),
        size=lambda w: DATASETS[w.dataset].get("image_size", 32),
        limit=lambda w: (lambda n: f"--limit {n}" if n else "")(DATASETS[w.dataset].get(f"limit_{w.split}")),
        write=lambda w: " ".join(
            [f"--write-mode {DATASETS[w.dataset].get('write_mode', 'raw')}",
             f"--jpeg-quality {DATASETS[w.dataset].get('jpeg_quality', 90)}",
             f"--compress-probability {DATASETS[w.dataset].get('compress_probability', 0.5)}"]
            + ([f"--max-resolution {DATASETS[w.dataset]['max_resolution']}"] if DATASETS[w.dataset].get("max_resolution") else [])
        ),
        classes=lambda w, input: f"--classes-from {input.classes}" if "classes" in input.keys() else "",
    threads: lambda w: DATASETS[w.dataset].get("workers", 2)
    resources:
        mem_mb=8000,
        runtime=240,
    log:
        f"{RESULTS}/logs/convert/{{dataset}}_{{split}}.log",
    conda:
        "../../envs/barlow.yaml"
    shell:
        "python -m barlow convert --kind {params.kind} --path {params.path} --split {wildcards.split}"
        " --out {output.beton} --image-size {params.size} {params.limit} {params.write} {params.classes}"
        " --workers {threads} > {log} 2>&1 || {{ grep -h '^error:' {log} >&2; exit 1; }}"  # the one-line error on the console
