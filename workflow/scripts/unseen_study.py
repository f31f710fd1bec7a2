"""Rule study_gather: every regime's scored models (RPG, the baselines, study.methods) in one table,
results/unseen_study.csv."""
from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.study import regime_config, write_study

smk = snakemake  # noqa: F821
names = list(smk.params.regimes)
per_regime = len(smk.input.samples) // len(names)  # generate's samples.csv, then one per study method
paths = {name: {"samples": smk.input.samples[i * per_regime:(i + 1) * per_regime], "rpg_summary": summary}
         for i, (name, summary) in enumerate(zip(names, smk.input.rpg_summary))}
run_rule(smk, lambda cfg: write_study(paths, {n: regime_config(smk.config, n) for n in names}, smk.output.csv))
