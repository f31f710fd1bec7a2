"""Classifier-free guidance: which scale, chosen on seen validation tasks only? (issue 31, item 3c)

Loads a study regime's trained generator (trained with `rpg.condition_dropout` > 0) and scores it on the regime's
validation tasks (seen, held out of RPG training; never an unseen task) at each guidance scale, with
`pipeline.guidance_validation`. The scale with the best score is the one a regime file then names as
`rpg.guidance_scale`. Paths are the workflow's for that regime under `--results`.

    PYTHONPATH=. python probes/guidance_scale.py --regime domains_few_cfg --results results \
        --out results/probes/guidance_domains_few_cfg.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rpg.config import config_from_dict, load_config
from rpg.experiments.task_zoo.pipeline import guidance_validation
from rpg.experiments.task_zoo.study import Regimes
from rpg.utils import write_csv_atomic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regime", required=True, help="a regime of config/experiments/regimes/")
    p.add_argument("--results", default="results", help="the workflow's results_dir")
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    p.add_argument("--samples", type=int, default=3, help="samples per validation task")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    base = load_config(args.config, overrides={"results_dir": args.results}).raw
    base["study"] = {**base["study"], "regimes": [args.regime]}
    regimes = Regimes(base)
    cfg = config_from_dict(regimes.config(args.regime))
    torch.set_num_threads(cfg.threads)
    res = Path(args.results)
    frame = guidance_validation(cfg, res / "rpg" / args.regime / "best.safetensors", res / "zoo" / regimes.zoo(args.regime),
                                res / "zoo" / args.regime / "split.json",
                                res / "features" / regimes.domains(args.regime) / "features.safetensors",
                                args.scales, args.samples)
    write_csv_atomic(args.out, frame)
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
