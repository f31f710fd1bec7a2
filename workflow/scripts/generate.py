"""Rule generate: sample heads for unseen / seen / flip-pair tasks; evaluate them beside their originals and the
baselines."""
from pathlib import Path

from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.pipeline import generate_and_evaluate
from rpg.experiments.task_zoo.study import job_config

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: generate_and_evaluate(cfg, smk.input.rpg, smk.input.split, smk.input.get("features"),
                                                Path(smk.input.index).parent, Path(smk.output.samples).parent,
                                                smk.input.get("backbone") or None),
         config=job_config(smk))
