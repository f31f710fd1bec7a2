"""Rule tables: Tables 11, 16, 12 and the seen-task summary."""
from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.tables import write_tables

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: write_tables(cfg, smk.input.samples, dict(smk.output.items())))
