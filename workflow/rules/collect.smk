# Collect the training data of RPG: the classifier zoo (and, in the default profile, the frozen backbone and its
# cached features first) -> seen / unseen split.


if CFG.zoo.mode == "batched_heads":

    rule backbone:
        input:
            cifar10_input,
        output:
            model=out("backbone", "backbone.safetensors"),
        log:
            logfile("backbone"),
        benchmark:
            benchfile("backbone")
        conda:
            "../envs/rpg.yaml"
        threads: CFG.threads
        resources:
            mem_mb=6000,
            gpu=GPU,
        params:
            setting=setting("seed", "data.val_images", "backbone"),
        script:
            "../scripts/backbone.py"

    rule features:
        input:
            cifar10_input,
            model=rules.backbone.output.model,
        output:
            features=FEATURES,
        log:
            logfile("features"),
        benchmark:
            benchfile("features")
        conda:
            "../envs/rpg.yaml"
        threads: CFG.threads
        resources:
            mem_mb=6000,
            gpu=GPU,
        params:
            setting=setting("seed", "data.val_images", "backbone"),
        script:
            "../scripts/features.py"

    rule zoo:
        input:
            features=FEATURES,
        output:
            checkpoints=directory(out("zoo", "checkpoints")),
            index=ZOO_INDEX,
            summary=out("zoo", "summary.json"),
        log:
            logfile("zoo"),
        benchmark:
            benchfile("zoo")
        conda:
            "../envs/rpg.yaml"
        threads: CFG.threads
        resources:
            mem_mb=8000,
            gpu=GPU,
        params:
            setting=setting("seed", "tasks.ids", "zoo"),
        script:
            "../scripts/zoo.py"

else:  # finetune: one job per task, so a cluster executor spreads them

    rule finetune_task:
        input:
            cifar10_input,
        output:
            expand(
                out("zoo", "checkpoints/{{task}}_{k}.safetensors"),
                k=range(CFG.zoo.n_checkpoints),
            ),
        log:
            logfile("finetune/{task}"),
        benchmark:
            benchfile("finetune/{task}")
        conda:
            "../envs/rpg.yaml"
        threads: CFG.threads
        resources:
            mem_mb=16000,
            gpu=GPU,
            runtime=60,
        params:
            setting=setting("seed", "data.val_images", "backbone", "zoo"),
        script:
            "../scripts/finetune_task.py"

    rule zoo:
        input:
            finetuned_checkpoints,
        output:
            index=ZOO_INDEX,
            summary=out("zoo", "summary.json"),
        log:
            logfile("zoo"),
        benchmark:
            benchfile("zoo")
        conda:
            "../envs/rpg.yaml"
        threads: 1
        resources:
            mem_mb=2000,
        params:
            setting=setting("tasks.ids", "zoo.n_checkpoints"),
        script:
            "../scripts/zoo_index.py"


rule split:
    input:
        index=ZOO_INDEX,  # the split is of the zoo's tasks: a new zoo gets a new split
    output:
        split=SPLIT,
    log:
        logfile("split"),
    benchmark:
        benchfile("split")
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=500,
    params:
        setting=setting(
            "seed",
            "tasks.ids",
            "tasks.unseen",
            "tasks.n_val",
            "tasks.n_seen",
            "tasks.holdout_neighbours",
        ),
    script:
        "../scripts/split.py"
