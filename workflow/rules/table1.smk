# Generation across architectures (paper Tables 1, 4-7): per architecture, train runs and collect checkpoints ->
# unconditional RPG per variant -> generated models scored on the test set -> table1.csv and ablations/*.csv.
wildcard_constraints:
    arch=r"[A-Za-z0-9_.]+",
    run=r"\d+",
    variant=AX.VARIANT_PATTERN,
    study="|".join(AX.STUDIES),
    family="|".join(AX.ABLATION_FAMILIES),


rule collect_checkpoints:
    input:
        cifar10_input,
        init=collect_init,
    output:
        collection=directory(f"{ARCH_RES}/collections/{{arch}}/run{{run}}"),
    log:
        f"{RES}/logs/table1/collect_{{arch}}_run{{run}}.log",
    benchmark:
        f"{RES}/benchmarks/rules/table1/collect_{{arch}}_run{{run}}.tsv"
    conda:
        "../envs/rpg.yaml"
    threads: arch_threads
    resources:
        mem_mb=4000,
        gpu=GPU,
    params:
        setting=collect_setting,
    script:
        "../scripts/collect_checkpoints.py"


rule train_arch_rpg:
    input:
        cifar10_input,
        runs=collection_runs,
    output:
        best=f"{ARCH_RES}/{{study}}/rpg/{{arch}}/{{variant}}/best.safetensors",
        summary=f"{ARCH_RES}/{{study}}/rpg/{{arch}}/{{variant}}/summary.json",
    log:
        f"{RES}/logs/table1/train_{{study}}_{{arch}}_{{variant}}.log",
    benchmark:
        f"{RES}/benchmarks/rules/table1/train_{{study}}_{{arch}}_{{variant}}.tsv"
    conda:
        "../envs/rpg.yaml"
    threads: arch_threads
    resources:
        mem_mb=6000,
        gpu=GPU,
    params:
        setting=generator_setting,
    script:
        "../scripts/train_arch_rpg.py"


rule generate_arch:
    input:
        cifar10_input,
        rpg=rules.train_arch_rpg.output.best,
        runs=collection_runs,
    output:
        samples=f"{ARCH_RES}/{{study}}/generated/{{arch}}/{{variant}}/samples.csv",
        summary=f"{ARCH_RES}/{{study}}/generated/{{arch}}/{{variant}}/summary.json",
        models=directory(f"{ARCH_RES}/{{study}}/generated/{{arch}}/{{variant}}/models"),
    log:
        f"{RES}/logs/table1/generate_{{study}}_{{arch}}_{{variant}}.log",
    benchmark:
        f"{RES}/benchmarks/rules/table1/generate_{{study}}_{{arch}}_{{variant}}.tsv"
    conda:
        "../envs/rpg.yaml"
    threads: arch_threads
    resources:
        # keep_freed_memory raised the task zoo's generate peak 1,870 -> 5,085 MB (AMD EPYC); cnn_1m's peaked at
        # 2,654 MB without it (Xeon)
        mem_mb=8000,
        gpu=GPU,
    params:
        setting=generation_setting,
    script:
        "../scripts/generate_arch.py"


rule table1:
    input:
        samples=lambda w: [
            arch_samples("main", name, main_variant(name))
            for name in CFG.architectures.table1
        ],
    output:
        table=report(
            f"{RES}/table1.csv",
            caption="../report/table.rst",
            category="Architecture study (Table 1, ablations)",
        ),
    log:
        f"{RES}/logs/table1/table1.log",
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        setting=setting("architectures.table1"),
    script:
        "../scripts/table1.py"


rule ablation:
    input:
        samples=ablation_inputs,
    output:
        table=report(
            f"{RES}/ablations/{{family}}.csv",
            caption="../report/table.rst",
            category="Architecture study (Table 1, ablations)",
        ),
        replicates=f"{RES}/ablations/{{family}}.replicates.csv",
    log:
        f"{RES}/logs/table1/ablation_{{family}}.log",
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        labels=ablation_labels,
    script:
        "../scripts/ablation.py"


rule table1_family:
    input:
        f"{RES}/table1.csv",
        expand(f"{RES}/ablations/{{family}}.csv", family=AX.ABLATION_FAMILIES),


all_targets.extend(
    [f"{RES}/table1.csv"]
    + expand(f"{RES}/ablations/{{family}}.csv", family=AX.ABLATION_FAMILIES)
)
