"""Rule collect_checkpoints: train one run of an architecture and save its checkpoint collection."""
from rpg.experiments.arch_study.study import collect_run
from rpg.experiments.rules import run_rule

smk = snakemake  # noqa: F821
init = smk.input.init  # the backbone, for collect.init_from: backbone (empty otherwise)
init = [init] if isinstance(init, str) else list(init)
run_rule(smk, lambda cfg: collect_run(cfg, smk.wildcards.arch, int(smk.wildcards.run), smk.output.collection,
                                      init_file=init[0] if init else None))
