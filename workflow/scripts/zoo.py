"""Rule zoo: all task heads from one shared initial head, in one batched computation."""
from pathlib import Path

from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.pipeline import build_zoo

run_rule(snakemake, lambda cfg: build_zoo(cfg, snakemake.input.features, Path(snakemake.output.index).parent))  # noqa: F821
