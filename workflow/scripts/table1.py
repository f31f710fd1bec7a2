"""Rule table1: original vs generated best / average / min accuracy per architecture."""
from rpg.experiments.arch_study.study import write_table1
from rpg.experiments.rules import run_rule

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: write_table1(cfg, smk.input.samples, smk.output.table))
