"""Rule backbone: train (default) or fetch (paper) the frozen feature extractor."""
from rpg.features import build_backbone
from rpg.rules import run_rule

run_rule(snakemake, lambda cfg: build_backbone(cfg, snakemake.output.model))  # noqa: F821
