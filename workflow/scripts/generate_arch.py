"""Rule generate_arch: sample full models from a variant's generator; score them and the originals."""
from pathlib import Path

from rpg.experiments.arch_study.study import generate_variant
from rpg.experiments.rules import run_rule

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: generate_variant(cfg, smk.wildcards.arch, smk.wildcards.variant, smk.input.rpg,
                                           smk.input.runs, Path(smk.output.samples).parent, smk.wildcards.study))
