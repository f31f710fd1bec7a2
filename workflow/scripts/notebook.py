"""Notebook rules: execute the notebook with papermill; input names other than `notebook` are its parameters."""
from rpg.experiments.notebooks import execute_notebook_rule
from rpg.experiments.rules import run_rule

smk = snakemake  # noqa: F821
run_rule(smk, lambda cfg: execute_notebook_rule(cfg, dict(smk.input.items()), dict(smk.output.items())))
