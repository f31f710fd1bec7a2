# The study of regimes (issue 13; target `unseen_study`, not part of table11): each regime is this config plus
# study.common plus config/experiments/regimes/<name>.yaml (rpg.experiments.task_zoo.study.Regimes), reusing this
# config's backbone and features. The regimes run through the default DAG's rules (their `regime` wildcard); this
# file only gathers their tables into one.


rule study_gather:
    input:
        table16=expand(
            rules.tables.output.table,
            results_dir=map(REGIMES.results_dir, CFG.study.regimes),
            table="table16",
        ),
        seen_summary=expand(
            rules.tables.output.table,
            results_dir=map(REGIMES.results_dir, CFG.study.regimes),
            table="seen_summary",
        ),
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
