# Paper tables (11, 16, 12 and the seen-task summary), one job each, with the resolved config beside each: at the top
# of the regime's results_dir (results/ for the default profile, results/study/<regime>/ for a study regime).


rule tables:
    input:
        samples=regime_file("generated", "samples.csv"),
    output:
        table=report(
            "{results_dir}/{table}.csv",
            caption="../report/table.rst",
            category="Task zoo (paper §5)",
        ),
    log:
        "{results_dir}/logs/tables/{table}.log",
    benchmark:
        "{results_dir}/benchmarks/rules/tables/{table}.tsv"
    conda:
        "../envs/rpg.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        setting=regime_setting("tasks.table11", "tasks.flip_pair"),
    script:
        "../scripts/tables.py"
