"""Rule split: seen (train / validation) and unseen task ids."""
from rpg.rules import run_rule
from rpg.task_zoo import write_split

run_rule(snakemake, lambda cfg: write_split(cfg, snakemake.output.split))  # noqa: F821
