"""Probe: a Table 1 row's generator trained with an EMA of its weights (validation only; the row's own trajectory).

Trains the row's main variant on its first collection with `architectures.models.<arch>.train.ema` set, and
prints the best validation step and score (the EMA copy is what validation scores). Run after `snakemake all` has
built the collection:

    .venv/bin/python probes/ema_probe.py vit_micro 0.995                 # -> results/probes/ema/vit_micro_ema0.995/
    .venv/bin/python probes/ema_probe.py cnn_m 0.995 --results results --out /tmp/ema_cnn_m

This is how `architectures.models.vit_micro.train.ema` was chosen (docs/table1.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rpg.config import load_config
from rpg.experiments.arch_study.study import train_variant


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arch", help="a Table 1 row, e.g. vit_micro")
    p.add_argument("ema", type=float, help="EMA decay of the generator's weights, e.g. 0.995")
    p.add_argument("--config", nargs="+", default=["config/config.yaml"], help="YAML files, later ones override")
    p.add_argument("--variant", default="mamba-2d-perm-runs1-tok256")
    p.add_argument("--results", type=Path, default=Path("results"), help="where `snakemake all` put the collections")
    p.add_argument("--out", type=Path, default=None, help="default: results/probes/ema/<arch>_ema<ema>")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path("results") / "probes" / "ema" / f"{args.arch}_ema{args.ema}"
    cfg = load_config(args.config, {"results_dir": str(out), "logging": {"wandb": False, "progress": False},
                                    "architectures": {"models": {args.arch: {"train": {"ema": args.ema}}}}})
    collection = args.results / "table1" / "collections" / args.arch / "run0"
    summary = train_variant(cfg, args.arch, args.variant, [str(collection)], str(out / "rpg"))
    result = {k: summary[k] for k in ("best_step", "best_score", "steps", "seconds")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
