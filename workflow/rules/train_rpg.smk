# Train the task-conditioned RPG of a regime on the training split of its zoo (unseen tasks are never read).


rule train_rpg:
    input:
        unpack(evaluation_inputs),
        index=zoo_index,
        split=rules.split.output.split,
    output:
        best=out("rpg", "best.safetensors", of="regime"),
        summary=out("rpg", "summary.json", of="regime"),
    log:
        logfile("train_rpg", of="regime"),
    benchmark:
        benchfile("train_rpg", of="regime")
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=8000,
        gpu=GPU,
    params:
        setting=regime_setting("seed", "data.val_images", "rpg", "diffusion", "train"),
    script:
        "../scripts/train_rpg.py"
