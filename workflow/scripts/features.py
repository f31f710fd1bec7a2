"""Rule features: cache backbone features of the train / validation / test images."""
from rpg.experiments.task_zoo.features import cache_features
from rpg.experiments.rules import run_rule

run_rule(snakemake, lambda cfg: cache_features(cfg, snakemake.input.model, snakemake.output.features))  # noqa: F821
