"""Whole models: test accuracy and seconds per generated model against the DDIM step count, same generators.

For every Table 1 generator of a results folder (`RESULTS/table1/main/rpg/<arch>/<variant>/best.safetensors`), samples
`architectures.samples` models at each `--steps` count from the same initial noise (`study.sample_variant`, the
seed `generate_arch` uses), scores them on the CIFAR-10 test set, and puts the originals' accuracy beside them (the
"original" rows of the generation's own `samples.csv`, same run). The count the table used (`sample_steps` of
table1.csv, chosen on validation images when `architectures.sample_steps` is a list) reproduces its generated row:
a check that the benchmark measures what the table reports. Why it exists: the task zoo samples heads with DDIM-10
(as good as DDIM-50 there, README), but the best count for whole networks differs by architecture; this shows, on
the test set and after the fact, what the validation choice gave up or gained. `--eta` adds DDIM's stochasticity
(0: deterministic; 1: as noisy as DDPM) as a second axis, and every row carries the samples' spread (mean L2 to the
other samples, `rpg.weightspace.mean_distance`) beside the collection's: whether noise in the sampler buys diversity
from a generator whose samples are narrow (x0-prediction, README), and what it costs in accuracy.

    flock /work/heavy.lock .venv/bin/python probes/arch_sample_steps.py --steps 10 20 50 100
Writes results/probes/arch_sample_steps.csv (+ .json), one row per architecture x step count x eta.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _machine: shared helpers
from _machine import ROOT, set_threads, write_results  # noqa: E402

from rpg.checkpoint import load_rpg  # noqa: E402
from rpg.config import load_config  # noqa: E402
from rpg.experiments.arch_study.study import (Variant, arch_spec, load_image_data, sample_variant,  # noqa: E402
                                              with_sample_steps)
from rpg.utils import resolve_device  # noqa: E402
from rpg.vision.architectures import build_model  # noqa: E402
from rpg.weightspace import flatten, mean_distance  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["config/config.yaml"], help="the profile the results came from")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100], help="DDIM step counts")
    p.add_argument("--eta", type=float, nargs="+", default=[None],
                   help="DDIM eta values (default: the generator's own; 0 deterministic, 1 as stochastic as DDPM)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("results/probes/arch_sample_steps.csv"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    cfg = load_config([ROOT / c for c in args.config])
    device = resolve_device(cfg.device)
    generators = sorted((args.results / "table1" / "main" / "rpg").glob("*/*/best.safetensors"))
    if not generators:
        raise SystemExit(f"no Table 1 generators under {args.results}/table1/main/rpg (run the table1 target first)")
    rows = []
    for path in generators:
        name, variant_id = path.parent.parent.name, path.parent.name
        spec = arch_spec(cfg, name)
        samples = pd.read_csv(args.results / "table1" / "main" / "generated" / name / variant_id / "samples.csv")
        originals = 100.0 * samples.loc[samples.kind == "original", "accuracy"]  # stored as a fraction
        original_spread = (float(samples.loc[samples.kind == "original", "l2_spread"].mean())
                           if "l2_spread" in samples else float("nan"))
        data = load_image_data(cfg, spec, device)
        test_accuracy = data.test.state_dict_scorer(build_model(spec.arch, spec.model_kwargs).to(device))
        model, tokenizer, diffusion_cfg, _ = load_rpg(path, device)
        for steps, eta in itertools.product(args.steps, args.eta):
            sampling = with_sample_steps(diffusion_cfg, steps)
            sampling = sampling if eta is None else dataclasses.replace(sampling, eta=eta)
            sds, seconds = sample_variant(cfg, spec, model, tokenizer, sampling,
                                          Variant.parse(variant_id).seed_of(cfg.seed))
            acc = pd.Series([100.0 * test_accuracy(sd) for sd in sds])
            points = flatten(sds)
            spread = float(mean_distance(points, points, exclude_self=True).mean())
            rows.append({"architecture": name, "variant": variant_id, "sample_steps": steps, "eta": sampling.eta,
                         "rpg_best_acc": acc.max(), "rpg_mean_acc": acc.mean(), "rpg_min_acc": acc.min(),
                         "rpg_l2_spread": spread, "original_l2_spread": original_spread,
                         "original_best_acc": originals.max(), "original_mean_acc": originals.mean(),
                         "gap_mean": originals.mean() - acc.mean(), "seconds_per_model": seconds,
                         "table_sample_steps": str(spec.sample_steps)})
            print(f"{name:10s} DDIM-{steps:<4d} eta {sampling.eta:.1f}  generated best/avg/min {acc.max():.2f} / "
                  f"{acc.mean():.2f} / {acc.min():.2f}  spread {spread:.3f} (originals {original_spread:.3f})  "
                  f"originals avg {originals.mean():.2f}  {seconds:.2f} s/model", flush=True)
    write_results(args.out, rows, vars(args), device)


if __name__ == "__main__":
    main()
