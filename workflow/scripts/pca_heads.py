"""Rule pca_heads: PCA of original and generated heads, distances to own vs. other tasks' originals."""
from pathlib import Path

from rpg.experiments.task_zoo.analysis import write_pca_heads
from rpg.experiments.rules import run_rule

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: write_pca_heads(cfg, Path(smk.input.index).parent, smk.input.split, smk.input.models,
                                          dict(smk.output.items())))
