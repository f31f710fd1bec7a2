"""Why the 1.2M-parameter row's generator stays at chance: training loss and validation accuracy vs. learning rate.

The Table 1 row `cnn_1m` (config/experiments/table1_cnn_1m.yaml) plateaued at a diffusion loss of ~0.27 from step 30
to its last step, 120, and generated models at chance (10 %). Each of its 4,701 learnable position embeddings is
the only per-token free parameter, so it must move by O(1) to encode its token; with a diffusion batch of 1,024 of
4,701 tokens it gets a gradient on ~22 % of the steps, and Adam moves it by about `lr` per update. The probe trains
the row's own generator (same collection, preset, tokenizer, diffusion) for `--steps` steps at each `--lrs` value
(constant after warm-up: no decay hides a plateau), then scores `--samples` generated models on the row's held-out
*validation* images (never the test set). Side by side in one run, one arm at a time.
Measured (README, *A million-parameter row*): lr 0.002 / 0.01 / 0.03 all end at loss ~0.27 and chance accuracy,
so the learning rate is not what holds the row back.

    flock /work/heavy.lock .venv/bin/python benchmarks/generator_lr_probe.py \
        --collection results/cnn_1m/table1/collections/cnn_1m/run0 --steps 200 --lrs 0.002 0.01 0.03
Writes results/benchmarks/generator_lr_probe.csv (+ .json): per arm the mean loss over the last 20 % of steps,
seconds per step, and the validation accuracy of the generated models.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import ROOT, set_threads, write_results  # noqa: E402

from rpg.config import load_config  # noqa: E402
from rpg.experiments.arch_study.study import (arch_spec, load_image_data, main_variant,  # noqa: E402
                                              variant_model_config)
from rpg.generate import sample_models  # noqa: E402
from rpg.checkpoint import load_rpg  # noqa: E402
from rpg.unconditional import train_on_collection  # noqa: E402
from rpg.utils import load_safetensors  # noqa: E402
from rpg.vision.architectures import build_model, count_parameters  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["config/config.yaml", "config/experiments/table1_cnn_1m.yaml"])
    p.add_argument("--arch", default="cnn_1m")
    p.add_argument("--collection", required=True, help="the row's collection folder (NN.safetensors files)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.002, 0.01, 0.03])
    p.add_argument("--samples", type=int, default=2, help="generated models scored per arm (validation images)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "generator_lr_probe.csv"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    cfg = load_config([ROOT / c for c in args.config])
    spec = arch_spec(cfg, args.arch)
    files = sorted(Path(args.collection).glob("[0-9][0-9].safetensors"))
    if not files:
        raise SystemExit(f"no checkpoints NN.safetensors in {args.collection}")
    state_dicts = [load_safetensors(f)[0] for f in files]
    template = build_model(spec.arch, spec.model_kwargs)
    n_params = count_parameters(template)
    model_cfg = variant_model_config(spec, main_variant(cfg, args.arch, n_params), n_params)
    data = load_image_data(cfg, spec.img_size, torch.device("cpu"))
    score = data.val.state_dict_scorer(template)
    rows = []
    for lr in args.lrs:
        train_cfg = dataclasses.replace(spec.train, steps=args.steps, lr=lr, min_lr_ratio=1.0, patience=None,
                                        eval_every=10 ** 9, save_every=args.steps)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            train_on_collection(state_dicts, tmp, model_cfg=model_cfg, diffusion_cfg=cfg.diffusion,
                                train_cfg=train_cfg, seed=cfg.seed, progress=False, force=True)
            seconds = time.perf_counter() - start
            log = pd.read_csv(Path(tmp) / "train_log.csv")
            model, tokenizer, diffusion_cfg, _ = load_rpg(Path(tmp) / "last.safetensors")
        sds = sample_models(model, tokenizer, diffusion_cfg, args.samples, seed=cfg.seed + 29)
        accs = [float(score(sd)) for sd in sds]
        tail = log["loss"].iloc[-max(1, len(log) // 5):]
        row = {"lr": lr, "steps": args.steps, "loss_first10": float(log["loss"].iloc[:10].mean()),
               "loss_tail": float(tail.mean()), "seconds_per_step": seconds / args.steps,
               "val_accuracy_mean": sum(accs) / len(accs), "val_accuracy_max": max(accs)}
        print(row, flush=True)
        rows.append(row)
    write_results(args.out, rows, vars(args), "cpu")


if __name__ == "__main__":
    main()
