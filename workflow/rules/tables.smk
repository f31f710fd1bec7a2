# Paper tables (11, 16, 12 and the seen-task summary), each with the resolved config beside it.


rule tables:
    input:
        samples=rules.generate.output.samples,
    output:
        table11=f"{RES}/table11.csv",
        table16=f"{RES}/table16.csv",
        table12=f"{RES}/table12.csv",
        seen_summary=f"{RES}/seen_summary.csv",
    log:
        logfile("tables"),
    benchmark:
        benchfile("tables")
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../scripts/tables.py"
