"""Why a Table 1 row's generator stays at chance: training loss and validation accuracy under changed settings.

The row `cnn_1m` (config/experiments/table1_cnn_1m.yaml, 1.2M parameters in 4,701 tokens) plateaued at a diffusion
loss of ~0.27 — the loss of a denoiser that ignores its condition — and generated models at chance (10 %). The probe
trains the row's own generator (same collection, preset, tokenizer, diffusion) once per *arm*, each arm a set of
overrides of the row's `train`, `rpg` (model) and `diffusion` settings, for `--steps` steps at a constant rate after
warm-up (no decay hides a plateau), records the loss curve, then scores `--samples` generated models on the row's
held-out *validation* images (never the test set) and measures how spread out they are: mean L2 between the
samples (`rpg_l2_spread`) beside the collection's own (`collection_l2_spread`), and each sample's L2 to the
nearest checkpoint (`rpg_l2_novelty`) beside the checkpoints' own nearest-neighbour distance
(`collection_l2_novelty`). Side by side in one run, one arm at a time. The loss is not comparable between arms that
predict different things (`diffusion.prediction`); the validation accuracy and the distances are. An arm with
`train.ema=<decay>` also reports the moving average of its weights (row "<label> (EMA <decay>)"), from the same run.

    flock /work/heavy.lock .venv/bin/python probes/generator_probe.py \
        --collection results/cnn_1m/table1/collections/cnn_1m/run0 --steps 150 \
        --arm "lr 0.002:train.lr=0.002" --arm "lr 0.03:train.lr=0.03"
`--layers head proj stages.0` trains on a slice of the collection (the tensors whose names start with one of
them; 90K of the 1.2M parameters), cheap enough to compare arms over hundreds of steps; a slice is not a network,
so it reports the loss curve only (no accuracy).
An arm is `label:key=value;key=value`, keys `train.<TrainConfig field>`, `model.<ModelConfig field>` or
`diffusion.<DiffusionConfig field>` (`diffusion.prediction=x0`), values
YAML (`model.denoiser_channels=[1, 16, 32, 16, 1]`). Writes results/probes/generator_probe.csv (+ .json) and
generator_probe_curves.csv (loss per step per arm).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _machine: shared helpers
from _machine import ROOT, set_threads, write_results  # noqa: E402

from rpg.checkpoint import load_rpg  # noqa: E402
from rpg.config import load_config  # noqa: E402
from rpg.experiments.arch_study.study import (arch_spec, load_image_data, main_variant,  # noqa: E402
                                              variant_model_config)
from rpg.generate import sample_models  # noqa: E402
from rpg.unconditional import train_on_collection  # noqa: E402
from rpg.utils import load_safetensors  # noqa: E402
from rpg.vision.architectures import build_model, count_parameters  # noqa: E402
from rpg.weightspace import flatten, mean_distance, nearest_and_mean_distance, nearest_distance  # noqa: E402


def parse_arm(text: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """`label:train.lr=0.01;model.denoiser_channels=[1, 8, 1]` -> (label, {"train": {...}, "model": {...}, ...})."""
    label, _, body = text.partition(":")
    overrides: dict[str, dict[str, Any]] = {"train": {}, "model": {}, "diffusion": {}}
    for item in filter(None, (s.strip() for s in body.split(";"))):
        key, eq, value = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not eq or not dot or section not in overrides:
            raise SystemExit(f"arm {text!r}: expected train.<field>=<value>, model.<field>=<value> or "
                             f"diffusion.<field>=<value>, got {item!r}")
        parsed = yaml.safe_load(value)
        overrides[section][field] = tuple(parsed) if isinstance(parsed, list) else parsed
    return label.strip() or body, overrides


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["config/config.yaml", "config/experiments/table1_cnn_1m.yaml"])
    p.add_argument("--arch", default="cnn_1m")
    p.add_argument("--collection", required=True, help="the row's collection folder (NN.safetensors files)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--arm", action="append", default=None, help="label:key=value;key=value (repeatable)")
    p.add_argument("--layers", nargs="+", default=None, help="train on the tensors with these name prefixes only")
    p.add_argument("--samples", type=int, default=2, help="generated models scored per arm (validation images)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "probes" / "generator_probe.csv"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    arms = [parse_arm(a) for a in (args.arm or ["row as configured:"])]
    set_threads(args.threads)
    cfg = load_config([ROOT / c for c in args.config])
    spec = arch_spec(cfg, args.arch)
    files = sorted(Path(args.collection).glob("[0-9][0-9].safetensors"))
    if not files:
        raise SystemExit(f"no checkpoints NN.safetensors in {args.collection}")
    state_dicts = [load_safetensors(f)[0] for f in files]
    if args.layers:
        state_dicts = [{k: v for k, v in sd.items() if k.startswith(tuple(args.layers))} for sd in state_dicts]
    template = build_model(spec.arch, spec.model_kwargs)
    n_params = count_parameters(template)
    base_model = variant_model_config(spec, main_variant(cfg, args.arch, n_params), n_params)
    data = load_image_data(cfg, spec, torch.device("cpu"))
    score = data.val.state_dict_scorer(template)
    collection = flatten(state_dicts)
    collection_nn, collection_mean = nearest_and_mean_distance(collection, collection, exclude_self=True)
    collection_spread = {"collection_l2_spread": float(collection_mean.mean()),
                         "collection_l2_novelty": float(collection_nn.mean())}
    rows, curves = [], []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for label, over in arms:
        model_cfg = dataclasses.replace(base_model, **over["model"])
        train_cfg = dataclasses.replace(spec.train, steps=args.steps, min_lr_ratio=1.0, patience=None,
                                        eval_every=10 ** 9, save_every=args.steps)
        train_cfg = dataclasses.replace(train_cfg, **over["train"])
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            diffusion_cfg = dataclasses.replace(spec.diffusion, **over["diffusion"])
            train_on_collection(state_dicts, tmp, model_cfg=model_cfg, diffusion_cfg=diffusion_cfg,
                                train_cfg=train_cfg, seed=cfg.seed, progress=False, force=True)
            seconds = time.perf_counter() - start
            log = pd.read_csv(Path(tmp) / "train_log.csv")
            # the weights as trained (last), and with train.ema their moving average (what best.safetensors holds
            # when nothing validates): both from the one training run
            weights = {label: load_rpg(Path(tmp) / "last.safetensors")}
            if train_cfg.ema:
                weights[f"{label} (EMA {train_cfg.ema})"] = load_rpg(Path(tmp) / "best.safetensors")
        curves += [{"arm": label, "step": int(s), "loss": float(v)} for s, v in zip(log["step"], log["loss"])]
        tail = log["loss"].iloc[-max(1, len(log) // 5):]
        smooth = log["loss"].rolling(20, min_periods=1).mean()  # loss at a step: the mean of the 20 steps to it
        marks = {f"loss_at_{k}": float(smooth.iloc[k - 1]) for k in (100, 200, 400, 800, 1600) if k <= len(log)}
        for name, (model, tokenizer, diffusion_cfg, _) in weights.items():
            accs, distances = [float("nan")], {}
            if not args.layers:
                sds = sample_models(model, tokenizer, diffusion_cfg, args.samples, seed=cfg.seed + 29)
                accs = [float(score(sd)) for sd in sds]
                points = flatten(sds)
                distances = {"rpg_l2_spread": float(mean_distance(points, points, exclude_self=True).mean()),
                             "rpg_l2_novelty": float(nearest_distance(points, collection).mean()),
                             **collection_spread}
            row = {"arm": name, "n_params": sum(v.numel() for v in state_dicts[0].values() if v.is_floating_point()),
                   "overrides": yaml.safe_dump(over, default_flow_style=True).strip(),
                   "steps": train_cfg.steps, "lr": train_cfg.lr, "loss_first10": float(log["loss"].iloc[:10].mean()),
                   "loss_tail": float(tail.mean()), **marks, "seconds_per_step": seconds / train_cfg.steps,
                   "val_accuracy_mean": sum(accs) / len(accs), "val_accuracy_max": max(accs), **distances}
            print(row, flush=True)
            rows.append(row)
        pd.DataFrame(curves).to_csv(Path(args.out).with_name(Path(args.out).stem + "_curves.csv"), index=False)
    write_results(args.out, rows, vars(args), "cpu")


if __name__ == "__main__":
    main()
