# Analysis notebooks (spec §2c) and Table 13: computations in rpg.experiments.task_zoo.analysis / rpg.experiments.task_zoo.finetune_curves write CSVs; the
# notebooks only load, plot and save figures. Executed copies go to results/notebooks/, figures to results/figures/.

FIGURES = f"{RES}/figures"


rule table13:
    input:
        unpack(evaluation_inputs),
        cifar10_input,
        models=out("generated", "models"),
        # the frozen backbone the generated heads sit on (default profile; the paper profile generates full models)
        backbone=lambda wc: (
            out("backbone", "backbone.safetensors")
            if CFG.zoo.mode == "batched_heads"
            else []
        ),
    output:
        table13=report(
            f"{RES}/table13.csv",
            caption="../report/table.rst",
            category="Task zoo (paper §5)",
        ),
        chosen=f"{RES}/table13.chosen.csv",
        config=f"{RES}/table13.config.yaml",
    log:
        logfile("table13"),
    benchmark:
        benchfile("table13")
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=4000,
        gpu=GPU,
    params:
        setting=setting("seed", "data.val_images", "backbone", "table13"),
    script:
        "../scripts/table13.py"


rule pca_heads:
    input:
        index=ZOO_INDEX,
        split=SPLIT,
        models=out("generated", "models"),
    output:
        points=out("analysis", "pca_points.csv"),
        distances=out("analysis", "pca_distances.csv"),
        summary=out("analysis", "pca_summary.csv"),
        config=out("analysis", "pca.config.yaml"),
    log:
        logfile("pca_heads"),
    benchmark:
        benchfile("pca_heads")
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=3000,
    params:
        setting=setting("seed", "zoo.n_checkpoints"),
    script:
        "../scripts/pca_heads.py"


rule similarity:
    input:
        unpack(evaluation_inputs),
        index=ZOO_INDEX,
        split=SPLIT,
        models=out("generated", "models"),
    output:
        models=out("analysis", "similarity_models.csv"),
        curve=out("analysis", "similarity_curve.csv"),
        summary=out("analysis", "similarity_summary.csv"),
        config=out("analysis", "similarity.config.yaml"),
    log:
        logfile("similarity"),
    benchmark:
        benchfile("similarity")
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=3000,
        gpu=GPU,
    params:
        setting=setting(
            "seed",
            "zoo.n_checkpoints",
            "analysis.noise_magnitudes",
            "analysis.noise_repeats",
        ),
    script:
        "../scripts/similarity.py"


# Each notebook rule: input names other than `notebook` are the notebook's papermill parameters (made absolute by
# the script); out_dir is the folder of the `figure` output.


rule notebook_pca_heads:
    input:
        notebook="notebooks/pca_heads.ipynb",
        points_csv=rules.pca_heads.output.points,
        summary_csv=rules.pca_heads.output.summary,
    output:
        notebook=f"{RES}/notebooks/pca_heads.ipynb",
        figure=report(
            f"{FIGURES}/pca_heads.png",
            caption="../report/figure.rst",
            category="Figures",
        ),
        csv=f"{FIGURES}/pca_heads.csv",
    log:
        logfile("notebook_pca_heads"),
    benchmark:
        benchfile("notebook_pca_heads")
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        setting=setting("analysis.kernel"),
    script:
        "../scripts/notebook.py"


rule notebook_similarity_iou:
    input:
        notebook="notebooks/similarity_iou.ipynb",
        models_csv=rules.similarity.output.models,
        curve_csv=rules.similarity.output.curve,
        summary_csv=rules.similarity.output.summary,
    output:
        notebook=f"{RES}/notebooks/similarity_iou.ipynb",
        figure=report(
            f"{FIGURES}/similarity_iou.png",
            caption="../report/figure.rst",
            category="Figures",
        ),
        csv=f"{FIGURES}/similarity_iou.csv",
    log:
        logfile("notebook_similarity_iou"),
    benchmark:
        benchfile("notebook_similarity_iou")
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        setting=setting("analysis.kernel"),
    script:
        "../scripts/notebook.py"


rule notebook_finetune_curves:
    input:
        notebook="notebooks/finetune_curves.ipynb",
        table13_csv=rules.table13.output.table13,
    output:
        notebook=f"{RES}/notebooks/finetune_curves.ipynb",
        figure=report(
            f"{FIGURES}/finetune_curves.png",
            caption="../report/figure.rst",
            category="Figures",
        ),
        csv=f"{FIGURES}/finetune_curves.csv",
    log:
        logfile("notebook_finetune_curves"),
    benchmark:
        benchfile("notebook_finetune_curves")
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        setting=setting("analysis.kernel"),
    script:
        "../scripts/notebook.py"


all_targets.extend(
    [
        rules.table13.output.table13,
        rules.notebook_pca_heads.output.notebook,
        rules.notebook_similarity_iou.output.notebook,
        rules.notebook_finetune_curves.output.notebook,
    ]
)
