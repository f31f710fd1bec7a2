"""Rule domain_features: the backbone's features of the study's image domains (plain images read from `features`)."""
from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.domains import cache_domain_features
from rpg.experiments.task_zoo.study import job_config

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: cache_domain_features(cfg, smk.input.backbone, smk.input.features, smk.output.features),
         config=job_config(smk))
