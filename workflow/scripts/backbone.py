"""Rule backbone: train (default) or fetch (paper) the frozen feature extractor."""
from rpg.experiments.task_zoo.features import build_backbone
from rpg.experiments.rules import run_rule

run_rule(snakemake, lambda cfg: build_backbone(cfg, snakemake.output.model))  # noqa: F821
