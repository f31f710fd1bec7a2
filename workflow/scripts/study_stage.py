"""Study rules (rules/study.smk): one stage of one regime, on that regime's config."""
from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.study import regime_config, run_stage

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: run_stage(smk.params.stage, cfg, dict(smk.input.items()), dict(smk.output.items())),
         config=regime_config(smk.config, smk.params.regime))
