"""Rule table13: fine-tuning curves on unseen tasks (scratch / fresh head / RPG init)."""
from rpg.experiments.task_zoo.finetune_curves import write_table13
from rpg.experiments.rules import run_rule

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: write_table13(cfg, smk.input.models, smk.input.get("features") or None,
                                        smk.input.get("backbone") or None,
                                        smk.output.table13))
