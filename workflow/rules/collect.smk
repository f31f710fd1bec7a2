# Collect the training data of RPG: the classifier zoo (and, in the default profile, the frozen backbone and its
# cached features first) -> seen / unseen split. Zoos and splits are per regime (common.smk): a regime's split sits
# beside the experiment's zoo folders, results/zoo/<regime>/split.json, its zoo in results/zoo/<zoo>/.


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

    # The study's domain tasks (rpg.experiments.task_zoo.domains): the same backbone's features of transformed
    # images, one folder per domain setting (regimes that differ only in their tasks share it).
    rule domain_features:
        input:
            features=FEATURES,  # domain 0 (identity) is read from here, and the image split is checked against it
            backbone=rules.backbone.output.model,
            images=cifar10_input,
        output:
            features=out("features", "features.safetensors", of="domains"),
        log:
            logfile("domain_features", of="domains"),
        benchmark:
            benchfile("domain_features", of="domains")
        conda:
            "../envs/rpg.yaml"
        threads: CFG.threads
        resources:
            mem_mb=6000,
            gpu=GPU,
        params:
            setting=regime_setting("seed", "data", "backbone", "domains"),
        script:
            "../scripts/domain_features.py"

    rule zoo:
        input:
            features=regime_features,
        output:
            checkpoints=directory(out("zoo", "checkpoints", of="zoo")),
            index=out("zoo", "index.csv", of="zoo"),
            summary=out("zoo", "summary.json", of="zoo"),
        log:
            logfile("zoo", of="zoo"),
        benchmark:
            benchfile("zoo", of="zoo")
        conda:
            "../envs/rpg.yaml"
        threads: CFG.threads
        resources:
            mem_mb=8000,
            gpu=GPU,
        params:
            setting=regime_setting("seed", "tasks.ids", "zoo", "domains"),
        script:
            "../scripts/zoo.py"

else:  # finetune: one job per task, so a cluster executor spreads them

    rule finetune_task:
        input:
            cifar10_input,
        output:
            [
                out("zoo", f"checkpoints/{{task}}_{k}.safetensors", of="zoo")
                for k in range(CFG.zoo.n_checkpoints)
            ],
        log:
            logfile("finetune/{task}", of="zoo"),
        benchmark:
            benchfile("finetune/{task}", of="zoo")
        conda:
            "../envs/rpg.yaml"
        threads: CFG.threads
        resources:
            mem_mb=16000,
            gpu=GPU,
            runtime=60,
        params:
            setting=regime_setting("seed", "data.val_images", "backbone", "zoo"),
        script:
            "../scripts/finetune_task.py"

    rule zoo:
        input:
            finetuned_checkpoints,
        output:
            index=out("zoo", "index.csv", of="zoo"),
            summary=out("zoo", "summary.json", of="zoo"),
        log:
            logfile("zoo", of="zoo"),
        benchmark:
            benchfile("zoo", of="zoo")
        conda:
            "../envs/rpg.yaml"
        threads: 1
        resources:
            mem_mb=2000,
        params:
            setting=regime_setting("tasks.ids", "zoo.n_checkpoints"),
        script:
            "../scripts/zoo_index.py"


rule split:
    input:
        index=zoo_index,  # the split is of the zoo's tasks: a new zoo gets a new split
    output:
        split=out("zoo", "split.json", of="regime"),
    log:
        logfile("split", of="regime"),
    benchmark:
        benchfile("split", of="regime")
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=500,
    params:
        setting=regime_setting(
            "seed",
            "tasks.ids",
            "tasks.unseen",
            "tasks.n_val",
            "tasks.n_seen",
            "tasks.holdout_neighbours",
            "tasks.label_free_domains",
            "domains",
        ),
    script:
        "../scripts/split.py"
