"""Rule zoo (paper profile): index the per-task fine-tuned checkpoints."""
from pathlib import Path

from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.pipeline import index_zoo
from rpg.experiments.task_zoo.study import job_config

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: index_zoo(cfg, Path(smk.output.index).parent), config=job_config(smk))
