"""Rule generate: sample heads for unseen / seen / flip-pair tasks and evaluate them beside their originals."""
from pathlib import Path

from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.pipeline import generate_and_evaluate

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: generate_and_evaluate(cfg, smk.input.rpg, smk.input.split, smk.input.get("features"),
                                                Path(smk.input.index).parent, Path(smk.output.samples).parent))
