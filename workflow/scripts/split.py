"""Rule split: seen (train / validation) and unseen task ids."""
from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.pipeline import write_split
from rpg.experiments.task_zoo.study import job_config

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: write_split(cfg, smk.output.split), config=job_config(smk))
