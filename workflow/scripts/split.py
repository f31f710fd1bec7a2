"""Rule split: seen (train / validation) and unseen task ids."""
from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.pipeline import write_split

run_rule(snakemake, lambda cfg: write_split(cfg, snakemake.output.split))  # noqa: F821
