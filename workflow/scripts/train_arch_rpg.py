"""Rule train_arch_rpg: an unconditional RPG on one architecture's checkpoint collection (one variant)."""
from pathlib import Path

from rpg.experiments.arch_study.study import train_variant
from rpg.experiments.rules import run_rule

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: train_variant(cfg, smk.wildcards.arch, smk.wildcards.variant, smk.input.runs,
                                        Path(smk.output.best).parent, smk.wildcards.study))
