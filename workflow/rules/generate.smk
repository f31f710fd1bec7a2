# Generate models for unseen, sampled seen and flip-pair tasks of a regime; evaluate them, their originals and the
# baselines (built from the training split only) on the test set.


rule generate:
    input:
        unpack(evaluation_inputs),
        rpg=rules.train_rpg.output.best,
        split=rules.split.output.split,
        index=zoo_index,
        # the backbone's 10-class classifier: the `compose` baseline (default profile only)
        backbone=lambda wc: (
            out("backbone", "backbone.safetensors")
            if CFG.zoo.mode == "batched_heads"
            else []
        ),
    output:
        samples=out("generated", "samples.csv", of="regime"),
        timing=out("generated", "timing.json", of="regime"),
        models=directory(out("generated", "models", of="regime")),
    log:
        logfile("generate", of="regime"),
    benchmark:
        benchfile("generate", of="regime")
    conda:
        "../envs/rpg.yaml"
    threads: CFG.threads
    resources:
        # 5,085 MB peak with keep_freed_memory (AMD EPYC, the default profile; 1,870 without)
        mem_mb=8000,
        gpu=GPU,
    params:
        setting=regime_setting(
            "seed",
            "rpg",
            "diffusion",
            "generate",
            "tasks.table11",
            "tasks.flip_pair",
            "tasks.n_seen_eval",
            "domains",
        ),
    script:
        "../scripts/generate.py"
