"""Rule finetune_task (paper profile): fully fine-tune the pretrained model on one binary task."""
from rpg.experiments.task_zoo.finetune import finetune_task
from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.study import job_config

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: finetune_task(cfg, int(smk.wildcards.task), list(smk.output)), config=job_config(smk))
