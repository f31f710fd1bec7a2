"""Rule train_rpg: the task-conditioned generator, best checkpoint chosen on validation (seen) tasks."""
from pathlib import Path

from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.pipeline import train_conditional_rpg
from rpg.experiments.task_zoo.study import job_config

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: train_conditional_rpg(cfg, Path(smk.input.index).parent, smk.input.split,
                                                smk.input.get("features"), Path(smk.output.best).parent),
         config=job_config(smk))
