"""Rule study_method: one `study.methods` entry fitted on a regime's training split and scored like the built-ins."""
from pathlib import Path

from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.pipeline import evaluate_method
from rpg.experiments.task_zoo.study import job_config

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: evaluate_method(cfg, smk.params.spec, smk.input.split, smk.input.features,
                                          Path(smk.input.index).parent, smk.input.samples, smk.output.samples,
                                          smk.input.get("backbone") or None, smk.input.rpg),
         config=job_config(smk))
