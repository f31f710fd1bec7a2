# Generate heads for unseen, sampled seen and flip-pair tasks; evaluate them and their originals on the test set.


rule generate:
    input:
        rpg=rules.train_rpg.output.best,
        split=rules.split.output.split,
        features=rules.features.output.features,
        index=rules.zoo.output.index,
    output:
        samples=out("generated", "samples.csv"),
        timing=out("generated", "timing.json"),
        heads=directory(out("generated", "heads")),
    log:
        logfile("generate"),
    benchmark:
        benchfile("generate")
    threads: CFG.threads
    resources:
        mem_mb=6000,
        gpu=GPU,
    script:
        "../scripts/generate.py"
