"""What a Table 1 row's network costs before its run: parameters, FLOPs per image, seconds per collection step and
per test-set pass, so that epochs, checkpoints and scored models can be cut to a time budget before the run.

For each `--arch` (entries of `architectures.models` in `--config`): parameters counted on the meta device
(`study.parameter_count`), FLOPs per image of the forward pass and of a training step (forward + backward) counted
by `torch.utils.flop_counter.FlopCounterMode`, the median wall / CPU seconds of `--steps` training steps of the
row's collection recipe (`rpg.vision.training.train_classifier` with its batch size, optimizer, label smoothing
and `collect.amp`, channels-last as `train_collection`), with the process's peak RSS, and one pass of
`ImageEvaluator` over `--images` images (the test set's size), the pass every scored checkpoint, generated model
and baseline costs. Images are random uint8 (the cost does not depend on their content), so no data is read.

    OMP_NUM_THREADS=2 flock /tmp/heavy.lock .venv/bin/python probes/whole_model_cost.py \
        --config config/config.yaml config/experiments/table1_cnn_10m.yaml --arch cnn_1m cnn_10m
Writes results/probes/whole_model_cost.csv (+ .json), one row per architecture.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _machine: shared helpers
from _machine import ROOT, peak_rss_mb, reset_peak_rss, set_threads, write_results  # noqa: E402

from rpg.config import load_config  # noqa: E402
from rpg.experiments.arch_study.study import arch_spec, parameter_count  # noqa: E402
from rpg.vision.architectures import build_model  # noqa: E402
from rpg.vision.evaluate import ImageEvaluator  # noqa: E402
from rpg.vision.preprocess import Preprocess, resolve_amp  # noqa: E402
from rpg.vision.training import make_optimizer, train_classifier  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["config/config.yaml"], help="the profile and its overlays")
    p.add_argument("--arch", nargs="+", default=["cnn_1m"], help="entries of architectures.models")
    p.add_argument("--steps", type=int, default=4, help="timed training steps (after one warm-up step)")
    p.add_argument("--images", type=int, default=10000, help="images of the timed evaluation pass")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS)")
    p.add_argument("--out", type=Path, default=Path("results/probes/whole_model_cost.csv"))
    return p.parse_args(argv)


def flops_per_image(model: torch.nn.Module, img_size: int, train: bool, batch: int = 8) -> float:
    """FLOPs per image of a forward pass (train=False, eval mode) or a forward + backward pass (train=True)."""
    x = torch.randn(batch, 3, img_size, img_size)
    model.train(train)
    with FlopCounterMode(display=False) as counter:
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def measure(cfg: Any, name: str, steps: int, n_images: int) -> dict[str, Any]:
    spec = arch_spec(cfg, name)
    recipe = spec.recipe
    torch.manual_seed(cfg.seed)
    model = build_model(spec.arch, spec.model_kwargs)
    row: dict[str, Any] = {"architecture": name, "arch": spec.arch, "model_kwargs": str(spec.model_kwargs),
                           "params": parameter_count(spec),
                           "forward_gflop_per_image": flops_per_image(model, spec.img_size, False) / 1e9,
                           "train_gflop_per_image": flops_per_image(model, spec.img_size, True) / 1e9}
    bf16 = resolve_amp(recipe.amp, "cpu")
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (recipe.batch_size * (steps + 1), 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (len(images),), generator=gen)
    optimizer = make_optimizer(model, recipe.optimizer, recipe.lr, recipe.weight_decay)
    times: list[tuple[float, float]] = []

    def clock(done: int, _model: torch.nn.Module) -> None:
        times.append((time.perf_counter(), time.process_time()))

    reset_peak_rss()
    times.append((time.perf_counter(), time.process_time()))
    train_classifier(model, images, labels, steps=steps + 1, batch_size=recipe.batch_size, optimizer=optimizer,
                     lr_at=lambda step: recipe.lr * recipe.collect_lr_ratio, gen=gen,
                     prepare=Preprocess(img_size=spec.img_size, channels_last=True), translate=recipe.translate,
                     flip=recipe.flip, label_smoothing=recipe.label_smoothing, bf16=bf16, on_step=clock,
                     progress=False)
    wall = [b[0] - a[0] for a, b in zip(times[1:], times[2:])]  # the first step (warm-up) left out
    cpu = [b[1] - a[1] for a, b in zip(times[1:], times[2:])]
    row.update(batch_size=recipe.batch_size, amp_bf16=bf16, train_step_s=statistics.median(wall),
               train_step_cpu_s=statistics.median(cpu), train_peak_rss_mb=peak_rss_mb())
    row["train_images_per_s"] = recipe.batch_size / row["train_step_s"]
    row["train_achieved_gflops"] = row["train_gflop_per_image"] * row["train_images_per_s"]
    test = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    evaluator = ImageEvaluator(test, torch.zeros(n_images, dtype=torch.long), img_size=spec.img_size)
    evaluator.predict(model)  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    evaluator.predict(model)
    row.update(eval_images=n_images, eval_pass_s=time.perf_counter() - start,
               eval_pass_cpu_s=time.process_time() - cpu_start)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    cfg = load_config([ROOT / c for c in args.config])
    rows = []
    for name in args.arch:
        rows.append(measure(cfg, name, args.steps, args.images))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    write_results(args.out, rows, {**{k: v for k, v in vars(args).items()}, "threads_used": torch.get_num_threads()},
                  "cpu")


if __name__ == "__main__":
    main()
