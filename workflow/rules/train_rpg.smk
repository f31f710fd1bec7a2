# Train the task-conditioned RPG on the training split of the zoo (unseen tasks are never read).


rule train_rpg:
    input:
        unpack(evaluation_inputs),
        index=ZOO_INDEX,
        split=SPLIT,
    output:
        best=out("rpg", "best.safetensors"),
        summary=out("rpg", "summary.json"),
    log:
        logfile("train_rpg"),
    benchmark:
        benchfile("train_rpg")
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=8000,
        gpu=GPU,
    params:
        setting=setting("seed", "data.val_images", "rpg", "diffusion", "train"),
    script:
        "../scripts/train_rpg.py"
