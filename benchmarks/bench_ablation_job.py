"""Where one seeded ablation job's time goes (`config/experiments/ablations_cnn_m.yaml`: cnn_m, 800 steps, diffusion
batch 256), and the scoring candidates that leave every number unchanged, side by side in one run.

A `train_arch_rpg` job is `steps` RPG training steps plus `steps / eval_every` validations (`val_samples` models
sampled and scored on `val_images` held-out images); a `generate_arch` job samples `samples` models per DDIM count of
`sample_steps`, scores them on the validation images to choose the count, then scores the chosen models and
3 x `baseline_samples` baselines on the test set (the originals' predictions were saved at collection). Each part is
timed on its own and multiplied by its count per job; the training step is split into the denoiser's forward and
backward (`diffusion_batch` tokens) and the recurrent model's, with the step's FLOPs (`FlopCounterMode`) over the
measured fp32 matmul peak on the same threads. Scoring candidates, each against the project's path
(`ImageEvaluator.state_dict_predictor`: the uint8 images standardised batch by batch for every model): the images
standardised once and reused (`prepared_once`), and that with all images in one batch (`prepared_one_batch`);
`same_predictions` says whether every predicted class is the same.

Random weights and images (speed does not depend on the values); no CIFAR-10 needed.

    OMP_NUM_THREADS=1 flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_ablation_job.py --threads 1  # ~2 min
Writes results/benchmarks/ablation_job.csv (+ .json).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import ROOT, set_threads, timed, write_results  # noqa: E402
from bench_generator_amp import training_step  # noqa: E402
from bench_roofline import add_peak_sizes_argument, matmul_peak  # noqa: E402
from bench_scoring import random_state_dicts  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, nargs="+",
                   default=[ROOT / "config" / "config.yaml", ROOT / "config" / "experiments" / "ablations_cnn_m.yaml"])
    p.add_argument("--variant", default="mamba-2d-perm-runs1-tok256", help="the ablation variant timed")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (after 3 warm-up steps)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each other part (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the family's jobs get 1)")
    p.add_argument("--images", type=int, default=10000, help="test images (CIFAR-10's test set: 10,000)")
    p.add_argument("--seed", type=int, default=0)
    add_peak_sizes_argument(p)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "ablation_job.csv")
    return p.parse_args(argv)


def median(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    runs = [timed(fn, torch.device("cpu"))[:2] for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def startup_seconds() -> float:
    """A job's imports (torch, timm, the study module) in a fresh interpreter."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import rpg.experiments.arch_study.study"], check=True, cwd=ROOT)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    set_threads(args.threads)
    from rpg.config import load_config
    from rpg.diffusion import create_diffusion
    from rpg.experiments.arch_study.study import Variant, arch_spec, variant_model_config
    from rpg.generate import sample_models
    from rpg.model import RPG
    from rpg.tokenize import Tokenizer
    from rpg.unconditional import make_score_validator
    from rpg.vision.architectures import build_model, count_parameters
    from rpg.vision.evaluate import ImageEvaluator, batched_outputs

    cfg = load_config(args.config)
    spec = arch_spec(cfg, cfg.architectures.ablations.arch, "ablation")
    variant = Variant.parse(args.variant)
    template = build_model(spec.arch, spec.model_kwargs).eval()
    model_cfg = variant_model_config(spec, variant, count_parameters(template))
    n_ckpt = spec.recipe.n_checkpoints * variant.runs
    sds = random_state_dicts(template, n_ckpt, args.seed)
    tokenizer = Tokenizer.fit(sds, model_cfg.token_size)
    tokens = torch.stack([tokenizer.tokenize(sd) for sd in sds])
    torch.manual_seed(args.seed)
    model = RPG(model_cfg, tokenizer.layer_index, tokenizer.token_index,
                n_permutation_states=n_ckpt if model_cfg.permutation_state else 0)
    diffusion = create_diffusion(spec.diffusion)
    tc = spec.train
    g = torch.Generator().manual_seed(args.seed)
    test_images = torch.randint(0, 256, (args.images, 3, spec.img_size, spec.img_size), dtype=torch.uint8, generator=g)
    val_images = test_images[: spec.val_images]
    labels = torch.randint(0, 10, (args.images,), generator=g)
    test = ImageEvaluator(test_images, labels, img_size=spec.img_size)
    val = ImageEvaluator(val_images, labels[: spec.val_images], img_size=spec.img_size)
    length = tokens.shape[2]
    step = training_step(model, diffusion, tokens, tokenizer.mask, tc.batch_size, tc.diffusion_batch, tc.grad_clip,
                         args.seed)

    model.train()
    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    step_flops = counter.get_total_flops()
    runs = [timed(step, torch.device("cpu"))[:2] for _ in range(args.steps)]
    step_s, step_cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

    proto = torch.randn(tc.diffusion_batch, model_cfg.d_model)
    x_t, t_den = torch.randn(tc.diffusion_batch, length), torch.randint(0, 1000, (tc.diffusion_batch,))

    def denoiser_step():
        model.denoiser(x_t, t_den, proto).square().mean().backward()

    with FlopCounterMode(display=False) as counter:
        denoiser_step()
    denoiser_flops = counter.get_total_flops()
    perm = torch.arange(tc.batch_size) % max(1, model.n_permutation_states)

    def recurrent_step():
        model.prototypes(tc.batch_size, perm if model.permutation is not None else None).square().mean().backward()

    validate = make_score_validator(tokenizer, spec.diffusion, val.state_dict_scorer(template), tc.val_samples, 0)
    peak = matmul_peak(torch.float32, args.peak_sizes)
    rows: list[dict] = []

    def add(part: str, job: str, seconds: float, cpu: float, per_job: float, flops: float = float("nan"),
            **extra) -> None:
        row = {"variant": args.variant, "job": job, "part": part, "seconds": seconds, "cpu_seconds": cpu,
               "per_job": per_job, "job_seconds": seconds * per_job, "flops": flops,
               "fraction_of_fp32_peak": flops / seconds / peak if flops == flops else float("nan"),
               "fp32_peak_flop_s": peak, **extra}
        rows.append(row)
        print(f"{job:9s} {part:44s} {seconds:8.4f} s x {per_job:6.0f} = {seconds * per_job:7.1f} s"
              + (f"  {row['fraction_of_fp32_peak']:.0%} of fp32 peak" if flops == flops else "")
              + "".join(f"  {k} {v}" for k, v in extra.items()), flush=True)

    add("RPG training step", "train", step_s, step_cpu, tc.steps, step_flops)
    add("step: denoiser forward + backward", "train", *median(denoiser_step, args.repeats), tc.steps, denoiser_flops)
    add("step: recurrent model forward + backward", "train", *median(recurrent_step, args.repeats), tc.steps)
    add("validation (sample + score val_samples)", "train", *median(lambda: validate(model), args.repeats),
        -(-tc.steps // tc.eval_every))
    model.eval()
    candidates = spec.sample_steps if isinstance(spec.sample_steps, (tuple, list)) else (spec.sample_steps,)
    for steps in candidates:
        d_cfg = dataclasses.replace(spec.diffusion, sample_steps=int(steps))
        add(f"sample {spec.samples} models, DDIM {steps}", "generate",
            *median(lambda: sample_models(model, tokenizer, d_cfg, spec.samples, seed=1), 1), 1)
    generated = sample_models(model, tokenizer, spec.diffusion, spec.samples, seed=1)
    sd = generated[0]
    add("validation score of one model", "generate", *median(lambda: val.state_dict_scorer(template)(sd),
                                                              args.repeats), spec.samples * len(candidates))
    n_test = spec.samples + 3 * (spec.baseline_samples or spec.samples)
    project = test.state_dict_predictor(template)
    reference = project(sd)
    ref_s, ref_cpu = median(lambda: project(sd), args.repeats)
    add("test score of one model (project path)", "generate", ref_s, ref_cpu, n_test)
    template.load_state_dict(sd)
    prepared = torch.cat([test.prepare(test_images[i:i + test.batch_size])
                          for i in range(0, len(test_images), test.batch_size)])
    for name, size in (("prepared_once", test.batch_size), ("prepared_one_batch", len(test_images))):
        fn = (lambda size=size: batched_outputs(template, prepared, lambda x: x, batch_size=size).argmax(1))
        s, c = median(fn, args.repeats)
        add(f"test score of one model ({name})", "generate", s, c, n_test, ratio=round(ref_s / s, 3),
            same_predictions=bool((fn() == reference).all()))
    add("job start (imports)", "both", startup_seconds(), float("nan"), 1)
    for job in ("train", "generate"):
        total = sum(r["job_seconds"] for r in rows if r["job"] in (job, "both") and not r["part"].startswith("step: ")
                    and "prepared" not in r["part"])
        print(f"{job}: estimated {total:.0f} s per job at {args.threads} thread(s)")
    write_results(args.out, rows, {**vars(args), "config": [str(p) for p in args.config]}, torch.device("cpu"))
    return rows


if __name__ == "__main__":
    main()
