# Paper tables (11, 16, 12 and the seen-task summary), each with the resolved config beside it.


rule tables:
    input:
        samples=rules.generate.output.samples,
    output:
        table11=report(
            f"{RES}/table11.csv",
            caption="../report/table.rst",
            category="Task zoo (paper §5)",
        ),
        table16=report(
            f"{RES}/table16.csv",
            caption="../report/table.rst",
            category="Task zoo (paper §5)",
        ),
        table12=report(
            f"{RES}/table12.csv",
            caption="../report/table.rst",
            category="Task zoo (paper §5)",
        ),
        seen_summary=report(
            f"{RES}/seen_summary.csv",
            caption="../report/table.rst",
            category="Task zoo (paper §5)",
        ),
    log:
        logfile("tables"),
    benchmark:
        benchfile("tables")
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        setting=setting("tasks.table11", "tasks.flip_pair"),
    script:
        "../scripts/tables.py"
