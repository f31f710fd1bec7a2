"""Rule zoo: all task heads from one shared initial head, in one batched computation."""
from pathlib import Path

from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.pipeline import build_zoo
from rpg.experiments.task_zoo.study import job_config

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: build_zoo(cfg, smk.input.features, Path(smk.output.index).parent), config=job_config(smk))
