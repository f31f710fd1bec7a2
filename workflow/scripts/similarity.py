"""Rule similarity: accuracy vs. max IoU of generated, original and noise-added original models (unseen tasks)."""
from pathlib import Path

from rpg.experiments.task_zoo.analysis import write_similarity
from rpg.experiments.rules import run_rule

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: write_similarity(cfg, Path(smk.input.index).parent, smk.input.split, smk.input.models,
                                           smk.input.get("features") or None, dict(smk.output.items())))
