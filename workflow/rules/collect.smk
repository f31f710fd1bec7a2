# Collect the training data of RPG: frozen backbone -> cached features -> the zoo of binary heads -> split.


rule backbone:
    input:
        cifar10_input,
    output:
        model=out("backbone", "backbone.safetensors"),
    log:
        logfile("backbone"),
    benchmark:
        benchfile("backbone")
    threads: CFG.threads
    resources:
        mem_mb=6000,
        gpu=GPU,
    script:
        "../scripts/backbone.py"


rule features:
    input:
        cifar10_input,
        model=rules.backbone.output.model,
    output:
        features=out("features", "features.safetensors"),
    log:
        logfile("features"),
    benchmark:
        benchfile("features")
    threads: CFG.threads
    resources:
        mem_mb=6000,
        gpu=GPU,
    script:
        "../scripts/features.py"


rule zoo:
    input:
        features=rules.features.output.features,
    output:
        heads=directory(out("zoo", "heads")),
        index=out("zoo", "index.csv"),
        summary=out("zoo", "summary.json"),
    log:
        logfile("zoo"),
    benchmark:
        benchfile("zoo")
    threads: CFG.threads
    resources:
        mem_mb=8000,
        gpu=GPU,
    script:
        "../scripts/zoo.py"


rule split:
    output:
        split=out("zoo", "split.json"),
    log:
        logfile("split"),
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../scripts/split.py"
