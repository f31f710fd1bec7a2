"""Test-set scoring of many models of one architecture: one model at a time (the project's path) vs. all in one
batched pass, with and without channels-last inputs, side by side in one run.

The project scores a Table 1 row's generated models, their BatchNorm-recomputed copies and the baselines on the
same test images, one state dict at a time (`ImageEvaluator.state_dict_predictor`: load into the template, run the
images in batches of `batch_size`). The candidate: `torch.func.functional_call` + `torch.func.vmap` over the stacked
state dicts (parameters and buffers), the images in chunks of `batch_size // models` so that a batched pass holds
as many activations as one model's pass. Under vmap a convolution over stacked weights runs as one grouped
convolution (groups = models), the first one (shared images) as one convolution with the models' filters stacked.

Rows: per Table 1 row (`--table1`, the default profile's CNN rows) and path (`one_at_a_time` / `batched_vmap`) and
layout (`channels_last` / `contiguous`): wall and process-CPU seconds (median of `--repeats` after a warm-up),
`ratio` = the project's path (one at a time, channels-last) / this path (> 1: faster), the largest logit
difference from the project's path and whether every predicted class (hence the accuracy) is the same. Random
weights with perturbed BatchNorm statistics (speed does not depend on the values).

    OMP_NUM_THREADS=2 flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_scoring.py        # ~7 min here
Writes results/benchmarks/scoring.csv (+ .json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import ROOT, set_threads, timed, write_results  # noqa: E402

PATHS = ("one_at_a_time", "batched_vmap")
LAYOUTS = ("channels_last", "contiguous")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, nargs="+", default=[ROOT / "config" / "config.yaml"],
                   help="the profile whose Table 1 rows are scored")
    p.add_argument("--table1", nargs="+", default=["cnn_s", "cnn_m", "cnn_1m"], help="Table 1 rows")
    p.add_argument("--models", type=int, default=8, help="models scored per row")
    p.add_argument("--images", type=int, nargs="+", default=[10000, 10000, 2000],
                   help="test images per row (one number for all rows, or one per row). Both paths run the images "
                        "in chunks of --batch-size image-models, so the ratio does not depend on the count beyond "
                        "a few chunks")
    p.add_argument("--batch-size", type=int, default=1000, help="images per pass of one model (ImageEvaluator's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per path (median), after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "scoring.csv")
    return p.parse_args(argv)


def random_state_dicts(template: nn.Module, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`n` state dicts of the template's architecture: fresh initialisations, BatchNorm statistics perturbed."""
    torch.manual_seed(seed)
    out = []
    for _ in range(n):
        for m in template.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        out.append({k: v.detach().clone() for k, v in template.state_dict().items()})
    return out


@torch.no_grad()
def batched_logits(template: nn.Module, state_dicts: Sequence[Mapping[str, torch.Tensor]], images: torch.Tensor,
                   prepare, batch_size: int) -> torch.Tensor:
    """Logits (M, N, classes) of every state dict on uint8 `images`: one vmapped pass per chunk of images."""
    from torch.func import functional_call, vmap

    template.eval()
    stacked = {k: torch.stack([sd[k] for sd in state_dicts]) for k in state_dicts[0]}
    run = vmap(lambda weights, x: functional_call(template, weights, (x,)), in_dims=(0, None))
    chunk = max(1, batch_size // len(state_dicts))
    return torch.cat([run(stacked, prepare(images[i:i + chunk])) for i in range(0, len(images), chunk)], dim=1)


def one_at_a_time_logits(template: nn.Module, state_dicts: Sequence[Mapping[str, torch.Tensor]],
                         images: torch.Tensor, prepare, batch_size: int) -> torch.Tensor:
    """The project's path: each state dict loaded into the template, the images in batches (`batched_outputs`)."""
    from rpg.vision.evaluate import batched_outputs

    out = []
    for sd in state_dicts:
        template.load_state_dict(dict(sd), strict=True)
        out.append(batched_outputs(template, images, prepare, batch_size=batch_size))
    return torch.stack(out)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    set_threads(args.threads)
    from rpg.config import load_config
    from rpg.experiments.arch_study.study import arch_spec
    from rpg.vision.architectures import build_model, count_parameters
    from rpg.vision.preprocess import Preprocess

    cfg = load_config(args.config)
    device = torch.device("cpu")
    counts = args.images if len(args.images) > 1 else args.images * len(args.table1)
    if len(counts) != len(args.table1):
        raise SystemExit(f"--images: one count or one per row ({len(args.table1)})")
    rows: list[dict] = []
    for name, n_images in zip(args.table1, counts):
        spec = arch_spec(cfg, name)
        template = build_model(spec.arch, spec.model_kwargs).to(device).eval()
        sds = random_state_dicts(template, args.models, args.seed)
        g = torch.Generator().manual_seed(args.seed)
        images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
        reference = None
        for layout in LAYOUTS:
            prepare = Preprocess(img_size=spec.img_size, device=device, channels_last=layout == "channels_last")
            for path in PATHS:
                fn = batched_logits if path == "batched_vmap" else one_at_a_time_logits
                logits = fn(template, sds, images, prepare, args.batch_size)  # also the warm-up
                runs = [timed(lambda: fn(template, sds, images, prepare, args.batch_size), device)[:2]
                        for _ in range(args.repeats)]
                seconds, cpu_seconds = (statistics.median(r[i] for r in runs) for i in (0, 1))
                if reference is None:  # the first row is the project's path: one at a time, channels-last
                    reference, reference_s = logits, seconds
                row = {"architecture": name, "arch": spec.arch, "params": count_parameters(template),
                       "models": len(sds), "images": n_images, "path": path, "layout": layout,
                       "seconds": seconds, "cpu_seconds": cpu_seconds,
                       "seconds_per_model_10k_images": seconds / len(sds) * 10000 / n_images,
                       "ratio": reference_s / seconds,
                       "max_abs_logit_diff": float((logits - reference).abs().max()),
                       "same_predictions": bool((logits.argmax(-1) == reference.argmax(-1)).all())}
                rows.append(row)
                print(f"{name:7s} {path:14s} {layout:14s} {seconds:8.2f} s  ratio {row['ratio']:.2f}  "
                      f"max |dlogit| {row['max_abs_logit_diff']:.1e}  same predictions {row['same_predictions']}")
    write_results(args.out, rows, {**vars(args), "config": [str(p) for p in args.config]}, device)
    return rows


if __name__ == "__main__":
    main()
