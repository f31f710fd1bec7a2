"""Rule finetune_few: each unseen task's head fine-tuned on k labelled images from RPG's sample, every head
baseline, the zoo's initial head and a fresh one (rpg.experiments.task_zoo.finetune_few)."""
from pathlib import Path

from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.finetune_few import write_finetune_few
from rpg.experiments.task_zoo.study import job_config

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: write_finetune_few(cfg, smk.input.features, Path(smk.input.index).parent, smk.input.split,
                                             smk.input.models, smk.output.csv, smk.output.summary),
         config=job_config(smk))
