"""Rule tables: one of Tables 11, 16, 12 and the seen-task summary, of the regime at that results_dir."""
from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.study import job_config
from rpg.experiments.task_zoo.tables import write_tables

smk = snakemake  # noqa: F821
table = smk.wildcards.table
run_rule(smk, lambda cfg: write_tables(cfg, smk.input.samples, {table: smk.output.table}, names=[table]),
         config=job_config(smk))
