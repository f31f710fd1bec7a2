"""Rule features: cache backbone features of the train / validation / test images."""
from rpg.features import cache_features
from rpg.rules import run_rule

run_rule(snakemake, lambda cfg: cache_features(cfg, snakemake.input.model, snakemake.output.features))  # noqa: F821
