# The study of regimes (issue 13; target `unseen_study`, not part of table11): each regime is this config plus
# study.common plus config/experiments/regimes/<name>.yaml (rpg.experiments.task_zoo.study.Regimes), reusing this
# config's backbone and features. The regimes run through the default DAG's rules (their `regime` wildcard); this
# file scores the methods of study.methods on each regime (rpg.experiments.task_zoo.methods) and gathers every
# regime's scored models into one table.


# study.methods: a user's own task-conditioned weight generators (`module:callable`), by folder name (ST.method_key)
STUDY_METHODS = {ST.method_key(spec): spec for spec in CFG.study.methods}
if len(STUDY_METHODS) != len(CFG.study.methods):
    raise WorkflowError(
        f"study.methods has entries with one folder name: {list(CFG.study.methods)}"
    )


rule study_method:
    input:
        unpack(evaluation_inputs),
        split=rules.split.output.split,
        index=zoo_index,
        samples=rules.generate.output.samples,  # RPG's novelty per group (the `noise`-like methods match it)
        rpg=rules.train_rpg.output.best,  # the regime's generator, for a method built on it (MethodContext.rpg_path)
        backbone=lambda wc: (
            out("backbone", "backbone.safetensors")
            if CFG.zoo.mode == "batched_heads"
            else []
        ),
    output:
        samples=f"{RES}/methods/{{regime}}/{{method}}/samples.csv",
    log:
        f"{RES}/logs/{{regime}}/study_method/{{method}}.log",
    benchmark:
        f"{RES}/benchmarks/rules/{{regime}}/study_method/{{method}}.tsv"
    wildcard_constraints:
        method="|".join(map(re.escape, STUDY_METHODS)) or "(?!)",
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=4000,
    params:
        spec=lambda wc: STUDY_METHODS[wc.method],
        setting=regime_setting(
            "seed",
            "generate",
            "tasks.n_seen_eval",
            "train.canonicalise",
            "domains",
        ),
    script:
        "../scripts/study_method.py"


rule study_gather:
    input:
        samples=study_samples,
        rpg_summary=expand(rules.train_rpg.output.summary, regime=CFG.study.regimes),
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
        # every regime's own tables (per task), under <results_dir>/study/<regime>/
        expand(
            rules.tables.output.table,
            results_dir=map(REGIMES.results_dir, CFG.study.regimes),
            table=["table16", "seen_summary"],
        ),


# RPG-initialised fine-tuning with few labels (issue 31; target `finetune_few`, not part of `all` nor of
# unseen_study): in regime study.finetune_few.regime, every unseen task's head fine-tuned on k labelled images from
# RPG's sample and each baseline's head (rpg.experiments.task_zoo.finetune_few).
rule study_finetune_few:
    input:
        features=regime_features,
        index=zoo_index,
        split=regime_file("zoo", "split.json"),
        models=regime_file("generated", "models"),
    output:
        csv="{results_dir}/finetune_few.csv",
        summary="{results_dir}/finetune_few.summary.csv",
        config="{results_dir}/finetune_few.config.yaml",
    log:
        "{results_dir}/logs/finetune_few.log",
    benchmark:
        "{results_dir}/benchmarks/rules/finetune_few.tsv"
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=4000,
    params:
        setting=regime_setting(
            "seed", "zoo", "train.canonicalise", "domains", "study.finetune_few"
        ),
    script:
        "../scripts/finetune_few.py"


rule notebook_finetune_few:
    input:
        notebook="notebooks/finetune_few.ipynb",
        finetune_csv=lambda wc: f"{finetune_few_dir()}/finetune_few.csv",
        summary_csv=lambda wc: f"{finetune_few_dir()}/finetune_few.summary.csv",
    output:
        notebook=f"{RES}/notebooks/finetune_few/{FINETUNE_FEW_REGIME}.ipynb",
        figure=report(
            f"{FIGURES}/finetune_few/{FINETUNE_FEW_REGIME}/finetune_few.png",
            caption="../report/figure.rst",
            category="Figures",
        ),
        csv=f"{FIGURES}/finetune_few/{FINETUNE_FEW_REGIME}/finetune_few.csv",
    log:
        f"{RES}/logs/study/notebook_finetune_few.log",
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        setting=setting("analysis.kernel"),
    script:
        "../scripts/notebook.py"


rule finetune_few:
    input:
        lambda wc: f"{finetune_few_dir()}/finetune_few.csv",
        rules.notebook_finetune_few.output.notebook,
