"""Where a generated BatchNorm network loses its accuracy: the generated weights or the generated running statistics?

For each generated model of a Table 1 row (`RESULTS/table1/main/generated/<arch>/<variant>/models/*.safetensors`) and
its nearest collection checkpoint (L2 over everything generated), scores on the CIFAR-10 test set, side by side:
  generated                      the sample as generated (the row's number)
  generated_weights+ckpt_stats   the sample's weights with the nearest checkpoint's running means / variances
  ckpt_weights+generated_stats   the nearest checkpoint's weights with the sample's running statistics
  checkpoint                     the nearest checkpoint itself
and, per BatchNorm layer, how far the generated statistics are from the checkpoint's in the units the network feels
them (mean shift in running standard deviations, |log| std ratio) and in the generator's own token units (RMS error
of the normalised tokens, beside the same for the layer's weight) — the first says what the error costs, the second
whether the generator is less precise on statistics than on weights.

    flock /work/heavy.lock .venv/bin/python probes/bn_statistics_probe.py \
        --config config/config.yaml config/experiments/table1_cnn_1m.yaml --models 5
Writes results/probes/bn_statistics_probe.csv (+ .json; one row per model x kind) and
bn_statistics_probe_layers.csv (one row per model x BatchNorm layer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _machine: shared helpers
from _machine import ROOT, set_threads, write_results  # noqa: E402

from rpg.checkpoint import load_rpg  # noqa: E402
from rpg.config import load_config  # noqa: E402
from rpg.experiments.arch_study.study import Variant, arch_spec, load_image_data, variant_collection  # noqa: E402
from rpg.utils import load_safetensors, resolve_device, write_csv_atomic  # noqa: E402
from rpg.vision.architectures import build_model  # noqa: E402
from rpg.weightspace import flatten, nearest_neighbours  # noqa: E402

STAT_SUFFIXES = ("running_mean", "running_var")
EPS = 1e-5  # BatchNorm's own epsilon


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["config/config.yaml"], help="the profile the results came from")
    p.add_argument("--arch", default=None, help="the Table 1 row (default: the only one with BatchNorm statistics)")
    p.add_argument("--models", type=int, default=0, help="first N generated models (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("results/probes/bn_statistics_probe.csv"))
    return p.parse_args(argv)


def with_statistics(weights: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with every BatchNorm running mean / variance taken from `stats`."""
    return {k: (stats[k] if k.endswith(STAT_SUFFIXES) else v).clone() for k, v in weights.items()}


def layer_errors(generated: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor],
                 token_error: dict[str, float]) -> list[dict]:
    """Per BatchNorm layer: mean shift in checkpoint standard deviations, |log std ratio| and token-space errors."""
    rows = []
    for key in [k for k in generated if k.endswith("running_mean")]:
        prefix = key.removesuffix("running_mean")
        var_c = checkpoint[prefix + "running_var"].double() + EPS
        var_g = generated[prefix + "running_var"].double() + EPS
        shift = (generated[key].double() - checkpoint[key].double()) / var_c.sqrt()
        rows.append({"layer": prefix.rstrip("."), "channels": len(var_c),
                     "mean_shift_rms_sd": shift.pow(2).mean().sqrt().item(),
                     "log_std_ratio_rms": (0.5 * torch.log(var_g / var_c)).pow(2).mean().sqrt().item(),
                     "token_rms_running_mean": token_error.get(key, float("nan")),
                     "token_rms_running_var": token_error.get(prefix + "running_var", float("nan")),
                     "token_rms_weight": token_error.get(prefix + "weight", float("nan"))})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    cfg = load_config([ROOT / c for c in args.config])
    device = resolve_device(cfg.device)
    results = Path(cfg.results_dir)
    generated_root = results / "table1" / "main" / "generated"
    rows, layer_rows = [], []
    for variant_dir in sorted(p for p in generated_root.glob("*/*") if (p / "models").is_dir()):
        name, variant_id = variant_dir.parent.name, variant_dir.name
        if args.arch not in (None, name):
            continue
        spec = arch_spec(cfg, name)
        template = build_model(spec.arch, spec.model_kwargs).to(device)
        if not any(k.endswith("running_var") for k in template.state_dict()):
            continue
        _, tokenizer, _, _ = load_rpg(results / "table1" / "main" / "rpg" / name / variant_id / "best.safetensors")
        runs = Variant.parse(variant_id).runs
        files = variant_collection(spec, [results / "table1" / "collections" / name / f"run{r}" for r in range(runs)],
                                   runs)
        collection = [load_safetensors(f)[0] for f in files]
        points = flatten(collection)
        samples = [load_safetensors(f)[0] for f in sorted((variant_dir / "models").glob("*.safetensors"))]
        samples = samples[: args.models or None]
        data = load_image_data(cfg, spec, device)
        score = data.test.state_dict_scorer(template)
        for i, sample in enumerate(samples):
            distance, index = nearest_neighbours(flatten([sample]), points)
            nearest = collection[int(index)]
            kinds = {"generated": sample, "generated_weights+ckpt_stats": with_statistics(sample, nearest),
                     "ckpt_weights+generated_stats": with_statistics(nearest, sample), "checkpoint": nearest}
            for kind, sd in kinds.items():
                acc = 100.0 * score(sd)
                rows.append({"architecture": name, "variant": variant_id, "model": i, "kind": kind,
                             "test_accuracy": acc, "l2_to_nearest": distance.item()})
                print(f"{name} model {i:2d} {kind:30s} {acc:6.2f} %", flush=True)
            gen_tok, ck_tok = tokenizer.tokenize(sample), tokenizer.tokenize(nearest)
            token_error = {}
            for layer in tokenizer.layers:
                diff = tokenizer.layer_values(gen_tok - ck_tok, layer)
                token_error[layer.name] = diff.pow(2).mean().sqrt().item()
            for row in layer_errors(sample, nearest, token_error):
                layer_rows.append({"architecture": name, "variant": variant_id, "model": i, **row})
    if not rows:
        raise SystemExit(f"no generated BatchNorm models under {generated_root} (run the row's table1 target first)")
    table = pd.DataFrame(rows)
    print(table.groupby("kind", sort=False).test_accuracy.agg(["mean", "min", "max"]).round(2).to_string())
    layers = pd.DataFrame(layer_rows)
    print(layers.groupby("layer", sort=False).mean(numeric_only=True).drop(columns="model").round(4).to_string())
    write_results(args.out, rows, vars(args), device)
    write_csv_atomic(args.out.with_name(args.out.stem + "_layers.csv"), layers)


if __name__ == "__main__":
    main()
