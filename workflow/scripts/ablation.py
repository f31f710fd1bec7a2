"""Rule ablation: one ablation family (recurrent model, position embedding, permutation state, token size)."""
from rpg.experiments.arch_study.study import write_ablation
from rpg.experiments.rules import run_rule

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: write_ablation(cfg, smk.wildcards.family, smk.params.labels, smk.input.samples,
                                         smk.output.table, smk.output.replicates))
