"""Rule unseen_study: every regime's tables in one long table, results/unseen_study.csv."""
from rpg.experiments.rules import run_rule
from rpg.experiments.task_zoo.study import regime_config, write_study

smk = snakemake  # noqa: F821
names = list(smk.params.regimes)
paths = {name: {"table16": t, "seen_summary": s, "rpg_summary": r}
         for name, t, s, r in zip(names, smk.input.table16, smk.input.seen_summary, smk.input.rpg_summary)}
run_rule(smk, lambda cfg: write_study(paths, {n: regime_config(smk.config, n) for n in names}, smk.output.csv))
