# The study of regimes (issue 13; target `unseen_study`, not part of table11): each regime is this config plus
# study.common plus config/experiments/regimes/<name>.yaml (rpg.experiments.task_zoo.study), reusing this config's
# backbone and features and running the default DAG's stage functions under <results_dir>/study/<regime>/.


rule study_domain_features:
    input:
        features=FEATURES,  # domain 0 (identity) is read from here, and the image split is checked against it
        backbone=out("backbone", "backbone.safetensors"),
        images=cifar10_input,
    output:
        features=f"{STUDY}/domain_features/{{fkey}}/features.safetensors",
    log:
        f"{RES}/logs/study/domain_features_{{fkey}}.log",
    benchmark:
        f"{RES}/benchmarks/rules/study/domain_features_{{fkey}}.tsv"
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=6000,
    params:
        stage="features",
        regime=lambda wc: features_owner(wc.fkey),
        setting=lambda wc: config_setting(
            regime_cfg(features_owner(wc.fkey)), "seed", "data", "backbone", "domains"
        ),
    script:
        "../scripts/study_stage.py"


rule study_zoo:
    input:
        features=zoo_features,
    output:
        checkpoints=directory(f"{STUDY}/zoos/{{zookey}}/checkpoints"),
        index=f"{STUDY}/zoos/{{zookey}}/index.csv",
        summary=f"{STUDY}/zoos/{{zookey}}/summary.json",
    log:
        f"{RES}/logs/study/zoo_{{zookey}}.log",
    benchmark:
        f"{RES}/benchmarks/rules/study/zoo_{{zookey}}.tsv"
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=8000,
    params:
        stage="zoo",
        regime=lambda wc: zoo_owner(wc.zookey),
        setting=regime_setting("seed", "tasks.ids", "zoo", "domains", zoo=True),
    script:
        "../scripts/study_stage.py"


rule study_split:
    input:
        index=regime_index,
    output:
        split=f"{STUDY}/{{regime}}/split.json",
    log:
        f"{RES}/logs/study/{{regime}}/split.log",
    conda:
        "../envs/rpg.yaml"
    threads: 1
    params:
        stage="split",
        regime=lambda wc: wc.regime,
        setting=regime_setting(
            "seed",
            "tasks.ids",
            "tasks.unseen",
            "tasks.n_val",
            "tasks.n_seen",
            "tasks.holdout_neighbours",
            "domains",
        ),
    script:
        "../scripts/study_stage.py"


rule study_train:
    input:
        features=regime_features,
        index=regime_index,
        split=rules.study_split.output.split,
    output:
        best=f"{STUDY}/{{regime}}/rpg/best.safetensors",
        summary=f"{STUDY}/{{regime}}/rpg/summary.json",
    log:
        f"{RES}/logs/study/{{regime}}/train_rpg.log",
    benchmark:
        f"{RES}/benchmarks/rules/study/{{regime}}/train_rpg.tsv"
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=8000,
    params:
        stage="train",
        regime=lambda wc: wc.regime,
        setting=regime_setting("seed", "data.val_images", "rpg", "diffusion", "train"),
    script:
        "../scripts/study_stage.py"


rule study_generate:
    input:
        features=regime_features,
        index=regime_index,
        split=rules.study_split.output.split,
        rpg=rules.study_train.output.best,
        backbone=out("backbone", "backbone.safetensors"),  # the compose baseline
    output:
        samples=f"{STUDY}/{{regime}}/generated/samples.csv",
        timing=f"{STUDY}/{{regime}}/generated/timing.json",
        models=directory(f"{STUDY}/{{regime}}/generated/models"),
    log:
        f"{RES}/logs/study/{{regime}}/generate.log",
    benchmark:
        f"{RES}/benchmarks/rules/study/{{regime}}/generate.tsv"
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=6000,
    params:
        stage="generate",
        regime=lambda wc: wc.regime,
        setting=regime_setting(
            "seed",
            "rpg",
            "diffusion",
            "generate",
            "train.canonicalise",
            "tasks",
            "domains",
        ),
    script:
        "../scripts/study_stage.py"


rule study_tables:
    input:
        samples=rules.study_generate.output.samples,
    output:
        table16=f"{STUDY}/{{regime}}/table16.csv",
        seen_summary=f"{STUDY}/{{regime}}/seen_summary.csv",
    log:
        f"{RES}/logs/study/{{regime}}/tables.log",
    conda:
        "../envs/rpg.yaml"
    threads: 1
    params:
        stage="tables",
        regime=lambda wc: wc.regime,
        setting=regime_setting("tasks.table11", "tasks.flip_pair"),
    script:
        "../scripts/study_stage.py"


rule study_gather:
    input:
        table16=expand(rules.study_tables.output.table16, regime=CFG.study.regimes),
        seen_summary=expand(
            rules.study_tables.output.seen_summary, regime=CFG.study.regimes
        ),
        rpg_summary=expand(rules.study_train.output.summary, regime=CFG.study.regimes),
    output:
        csv=f"{RES}/unseen_study.csv",
    log:
        f"{RES}/logs/study/unseen_study.log",
    conda:
        "../envs/rpg.yaml"
    threads: 1
    params:
        regimes=CFG.study.regimes,
    script:
        "../scripts/unseen_study.py"


rule notebook_unseen_study:
    input:
        notebook="notebooks/unseen_study.ipynb",
        study_csv=rules.study_gather.output.csv,
    output:
        notebook=f"{RES}/notebooks/unseen_study.ipynb",
        figure=report(
            f"{FIGURES}/unseen_study.png",
            caption="../report/figure.rst",
            category="Figures",
        ),
        csv=f"{FIGURES}/unseen_study.csv",
    log:
        f"{RES}/logs/study/notebook_unseen_study.log",
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        setting=setting("analysis.kernel"),
    script:
        "../scripts/notebook.py"


rule unseen_study:
    input:
        rules.study_gather.output.csv,
        rules.notebook_unseen_study.output.notebook,
