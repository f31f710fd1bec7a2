# Generate models for unseen, sampled seen and flip-pair tasks; evaluate them and their originals on the test set.


rule generate:
    input:
        unpack(evaluation_inputs),
        rpg=rules.train_rpg.output.best,
        split=SPLIT,
        index=ZOO_INDEX,
    output:
        samples=out("generated", "samples.csv"),
        timing=out("generated", "timing.json"),
        models=directory(out("generated", "models")),
    log:
        logfile("generate"),
    benchmark:
        benchfile("generate")
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        mem_mb=6000,
        gpu=GPU,
    params:
        setting=setting(
            "seed",
            "rpg",
            "diffusion",
            "generate",
            "tasks.table11",
            "tasks.flip_pair",
            "tasks.n_seen_eval",
        ),
    script:
        "../scripts/generate.py"
